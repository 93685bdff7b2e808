"""Key custody (issue 15): the pipeline cannot read identities, and no key is swapped or lost silently."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.context import Haven
from safehaven.core import pins
from safehaven.core.home import Home
from safehaven.core.keys import (
    VAULT,
    KeyRing,
    KeyRingError,
    agreement_purpose,
    key_id,
    open_sealed,
    x25519_private,
    x25519_public,
)
from safehaven.core.pins import epoch_key_id
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import custody, key_record, rotation, vault
from safehaven.share import due, review
from safehaven.share.releases import PREPARED, RELEASED, ReleaseRefused, prepare
from tests.conftest import (
    TEST_PASSPHRASE,
    build_populated,
    copy_haven,
    custodian_ring,
    leaked_nhs_numbers,
)
from tests.forkserver import ForkServer
from tests.governance_helpers import (
    REVIEWERS,
    adopt_project_agreements,
    approve_release,
    login_of,
    prepare_and_release,
)
from tests.unit.populate import drop, populated, process

ROOT = Path(__file__).resolve().parents[2]
AGREEMENT = "statutory-gp-audit"  # an approved pseudonymised agreement of the project


@pytest.fixture(scope="module")
def populated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A haven set up as ``home`` is (the vault pair sealed) and ``populated`` with 120 patients,
    built once for the module to be copied (``copy_haven``), never changed."""
    return build_populated(tmp_path_factory, "populated-custody", patients=120)


@pytest.fixture
def haven_home(home: Home, populated_template: Path) -> Home:
    """``home`` as ``populated(home, patients=120)`` leaves it (a copy of the module's template)."""
    return copy_haven(populated_template, home)


@pytest.fixture
def adopted_home(haven_home: Home) -> Home:
    """``haven_home`` with the project's agreements adopted as the governance lead would."""
    adopt_project_agreements(haven_home)
    return haven_home


def _entries(home: Home) -> int:
    with Store(home).connect(read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {vault.IDENTITY}").fetchone()[0]


def _outsider_public() -> bytes:
    return x25519_public(x25519_private())


# --- custody -------------------------------------------------------------------------------


def test_the_vault_private_key_rests_sealed_and_the_pipeline_cannot_open_it(home: Home) -> None:
    keyring = KeyRing(home.keys)
    sealed = keyring.path(VAULT).read_bytes()
    assert sealed.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") and b"\n-----BEGIN PRIVATE KEY" not in sealed
    assert keyring.unsealed_private_keys() == []
    with pytest.raises(vault.VaultError, match="key custodian"):
        vault.private_key(keyring)
    private = vault.private_key(custodian_ring(home))
    assert key_id(x25519_public(private.material)) == keyring.current_id(VAULT)
    assert private.hex not in repr(private) and "passphrase hidden" in repr(custodian_ring(home).custodian)


def test_an_unsealed_vault_key_stops_the_pipeline_until_the_custodian_seals_it(haven_home: Home) -> None:
    from resources.haven import SafeHavenResource

    keyring = custodian_ring(haven_home)
    raw = keyring.get_private(VAULT).material
    keyring._write_file(keyring.path(VAULT), raw.hex().encode(), 0o600)  # as an older key ring left it
    pipeline = SafeHavenResource(home=str(haven_home.root))
    for _ in range(2):  # and again on the next run: it keeps refusing
        with pytest.raises(KeyRingError, match="unencrypted private key.*seal-vault"):
            pipeline.store()
    shutil.copy(keyring.path(VAULT), haven_home.keys / "backup.key")  # a raw copy under another name
    os.chmod(haven_home.keys / "backup.key", 0o600)
    assert haven_home.keys / "backup.key" in keyring.unsealed_private_keys()
    (haven_home.keys / "backup.key").unlink()

    done = custody.seal_vault(haven_home, keyring, actor="custodian")
    assert done and keyring.unsealed_private_keys() == []
    pipeline.store()  # the pipeline starts again
    assert keyring.get_private(VAULT).material == raw, "the same pair, sealed in place"
    with pipeline.connect() as con:
        from safehaven.core import audit

        assert [e.action for e in audit.entries_for(con, object_like="key:vault")][-1] == "key.seal"


# --- pinning: each substitution is refused and nothing is written ----------------------------


def test_a_substituted_vault_public_key_is_refused_and_nothing_is_vaulted(haven_home: Home) -> None:
    keyring = KeyRing(haven_home.keys)
    expected = keyring.current_id(VAULT)
    before = _entries(haven_home)
    path = keyring.public_path(VAULT)
    path.write_text(_outsider_public().hex())
    path.chmod(0o644)  # a public key file may be 0644
    drop(haven_home, patients=40, seed=21)
    with pytest.raises(KeyRingError, match=f"records key {expected}.*custodian's backup"):
        process(haven_home)
    assert _entries(haven_home) == before
    # the attacker also rewrites keyring.json: the store's epoch still refuses
    manifest = (haven_home.keys / "keyring.json").read_text().replace(expected, key_id(bytes.fromhex(path.read_text())))
    (haven_home.keys / "keyring.json").write_text(manifest)
    with pytest.raises(KeyRingError, match=f"made with key {expected}"):
        process(haven_home)
    assert _entries(haven_home) == before


@pytest.mark.parametrize("purpose", ["store", "audit", "haven"])
def test_a_swapped_or_missing_symmetric_key_is_refused_naming_the_key_expected(haven_home: Home, purpose: str) -> None:
    from resources.haven import SafeHavenResource
    from safehaven.core import audit

    keyring = KeyRing(haven_home.keys)
    with Store(haven_home).connect() as con:  # the audit key is made by the first audit entry
        audit.append(con, actor="tester", role="key_custodian", action="test", object="keys", home=haven_home)
    expected = keyring.get(purpose).key_id
    saved = keyring.path(purpose).read_bytes()
    keyring._write_file(keyring.path(purpose), os.urandom(32).hex().encode(), 0o600)
    pipeline = SafeHavenResource(home=str(haven_home.root))
    with pytest.raises(KeyRingError, match=f"records key {expected}"):
        with pipeline.connect():
            pass
    keyring.path(purpose).unlink()
    with pytest.raises(Exception, match=f"{expected}|missing"):
        with pipeline.connect():
            pass
    assert not keyring.path(purpose).exists(), "a recorded key is never re-created"
    keyring._write_file(keyring.path(purpose), saved, 0o600)
    with pipeline.connect():
        pass


@pytest.mark.parametrize("purpose", ["audit", "haven"])
def test_a_key_replaced_with_its_record_is_refused_by_the_stores_epoch(haven_home: Home, purpose: str) -> None:
    """keyring.json rewritten to match a substituted key: the store's epoch still refuses it
    (``pins.verify``, both epochs read in one query on each pipeline connection)."""
    from resources.haven import SafeHavenResource
    from safehaven.core import audit

    keyring = KeyRing(haven_home.keys)
    with Store(haven_home).connect() as con:  # the audit key and its epoch are made by the first audit entry
        audit.append(con, actor="tester", role="key_custodian", action="test", object="keys", home=haven_home)
    pipeline = SafeHavenResource(home=str(haven_home.root))
    with pipeline.connect() as con:
        expected = epoch_key_id(con, purpose)
        assert pins.current_epochs(con)[purpose] == expected == keyring.get(purpose).key_id
    keyring.write(purpose, os.urandom(32), replace=True)  # recorded in keyring.json as current
    with pytest.raises(KeyRingError, match=f"made with key {expected}"):
        with pipeline.connect():
            pass


def test_a_deleted_agreement_key_stops_that_agreements_release(adopted_home: Home) -> None:
    keyring = KeyRing(adopted_home.keys)
    registry = ContractRegistry()
    with Store(adopted_home).connect() as con:
        first = prepare_and_release(con, AGREEMENT, haven=Haven.open(adopted_home, contracts=registry, keyring=keyring))
    assert first.status == RELEASED
    path = keyring.path(agreement_purpose(AGREEMENT))
    expected = keyring.current_id(agreement_purpose(AGREEMENT))
    path.unlink()
    with Store(adopted_home).connect() as con:
        with pytest.raises(ReleaseRefused, match=f"{expected}.*custodian's backup"):
            prepare(con, AGREEMENT, haven=Haven.open(adopted_home, contracts=registry, keyring=keyring))
        (adopted_home.keys / "keyring.json").unlink()  # the key ring's record lost too: every key refused
        with pytest.raises(Exception, match="has no note of any key for 'audit'.*keys recover-record"):
            prepare(con, AGREEMENT, haven=Haven.open(adopted_home, contracts=registry, keyring=keyring))
    recovered = key_record.recover_record(adopted_home, custodian_ring(adopted_home), actor="custodian")
    assert agreement_purpose(AGREEMENT) not in {r.purpose for r in recovered}, "a missing file is not recorded"
    with Store(adopted_home).connect() as con:  # the record recovered, the store's epoch still names the salt
        with pytest.raises(ReleaseRefused, match=f"{expected}.*custodian's backup"):
            prepare(con, AGREEMENT, haven=Haven.open(adopted_home, contracts=registry, keyring=keyring))
        assert epoch_key_id(con, agreement_purpose(AGREEMENT)) == expected
    assert not path.exists(), "never silently re-created"
    assert sorted(p.name for p in (adopted_home.releases / AGREEMENT).iterdir()) == [first.release_id]


def _project(home: Home, keyring: KeyRing) -> Haven:
    """The context under the project's contracts (whose agreements ``adopted_home`` adopted)."""
    return Haven.open(home, contracts=ContractRegistry(), keyring=keyring)


def _owner_only(directory: Path) -> None:
    for path in [directory, directory.parent, *directory.iterdir()]:
        want = 0o700 if path.is_dir() else 0o600
        assert path.stat().st_mode & 0o777 == want, path


def test_release_files_and_folders_are_owner_only(adopted_home: Home) -> None:
    with Store(adopted_home).connect() as con:
        result = prepare(con, AGREEMENT, haven=Haven.open(adopted_home, contracts=ContractRegistry()))
        assert result.status == PREPARED and result.directory is not None
        _owner_only(result.directory)  # staged for review
        approve_release(con, result.release_id, adopted_home, registry=ContractRegistry())
    _owner_only(adopted_home.releases / AGREEMENT / result.release_id)  # delivered


def test_a_prepared_request_pins_the_agreement_salt(adopted_home: Home) -> None:
    """Staged files already hold pseudonyms under the salt: a lost salt is never re-created."""
    assert pins.RELEASE_REQUESTS == review.REQUESTS
    keyring = KeyRing(adopted_home.keys)
    with Store(adopted_home).connect() as con:
        assert prepare(con, AGREEMENT, haven=_project(adopted_home, keyring)).status == PREPARED
        keyring.path(agreement_purpose(AGREEMENT)).unlink()
        con.execute(f"DELETE FROM {pins.EPOCHS} WHERE purpose = ?", [agreement_purpose(AGREEMENT)])
        (adopted_home.keys / "keyring.json").unlink()  # no record left but the request itself
        with pytest.raises(KeyRingError, match="custodian's backup"):
            pins.agreement_salt(con, keyring, AGREEMENT)
    assert not keyring.path(agreement_purpose(AGREEMENT)).exists()


# --- vault rotation: a crash at every step loses no entry ------------------------------------

KILLER = """
import os, signal, sys
from pathlib import Path

home_dir, step = sys.argv[1], sys.argv[2]
from safehaven.context import Haven
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import rotation, vault
from tests.conftest import test_custodian

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if step == "transaction":  # inside the re-wrapping transaction, before its commit
    rewrap = vault.rewrap_all
    vault.rewrap_all = lambda *a, **k: (rewrap(*a, **k), die())
else:  # just before the n-th atomic rename of the rotation (each one a durable step)
    real, calls = os.replace, [0]
    def replace(*a, **k):
        calls[0] += 1
        if calls[0] == int(step):
            die()
        return real(*a, **k)
    os.replace = replace
home = Home(Path(home_dir))
custodian = KeyRing(home.keys, test_custodian())
rotation.rotate(Haven.open(home, contracts=ContractRegistry(), keyring=custodian, actor="custodian"), "vault")
"""


def _rotate_and_kill(forkserver: ForkServer, home: Home, step: str) -> int:
    """The rotation in a process of its own, killed at ``step`` (a fork of the warm interpreter,
    ``tests.forkserver``: sixteen cases paid their imports once)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return forkserver.run(["-c", KILLER, str(home.root), step], env=env, cwd=ROOT, timeout=600).returncode


def _check_every_entry_decrypts(home: Home) -> None:
    keyring = custodian_ring(home)
    with Store(home).connect() as con:
        held = con.execute(f"SELECT count(*) FROM {vault.IDENTITY}").fetchone()[0]
        assert vault.decrypt_table(con, vault.private_key(keyring), "true", "_all") == held
        vaulted = {r[0] for r in con.execute("SELECT value FROM _all WHERE field = 'nhs_number'").fetchall()}
        landed = {
            r[0]
            for c in ("hospital_episodes", "social_care")
            for r in con.execute(f"SELECT nhs_number FROM landing.{c}_valid").fetchall()
        }
        assert landed and landed <= vaulted, "every person of every drop is in the vault"
        assert epoch_key_id(con, VAULT) == keyring.current_id(VAULT)


def _reanchor_if_behind(home: Home) -> None:
    """A kill while an audit entry of the rotation was being anchored leaves the trail behind its
    anchor: the nightly run's verification refuses it, and so do vault writes, which check the
    trail's record of the vault key (``safehaven.core.pins.check_vault_audited``), until a person
    re-anchors after review (``safehaven audit anchor``), as they would."""
    from safehaven.core import audit

    with Store(home).connect() as con:
        result = audit.verify(con, home)
        if not result.ok:
            assert result.kind == "anchor", result
            audit.anchor(con, home)


def _state(home: Home) -> str:
    """Where a killed rotation stopped, read from the files and the store (custodian's view)."""
    keyring = custodian_ring(home)
    with Store(home).connect(read_only=True) as con:
        committed = epoch_key_id(con, VAULT)
    public_id = key_id(bytes.fromhex(keyring.public_path(VAULT).read_text()))
    private = open_sealed(keyring.path(VAULT).read_bytes(), TEST_PASSPHRASE.encode(), keyring.path(VAULT))
    if key_id(x25519_public(private)) != public_id:
        return "split pair"  # vault.key new, vault.pub old
    if not rotation.pending(keyring):
        return "finished" if committed == public_id else "not started"
    return "committed, not installed" if committed == keyring.staged_public_id(VAULT) else "staged"


@pytest.mark.slow
def test_vault_rotation_killed_at_every_step_loses_no_entry(home: Home, tmp_path: Path, forkserver: ForkServer) -> None:
    populated(home, patients=60)
    with Store(home).connect() as con:  # a haven that has run has an audit trail (and its key) already
        from safehaven.core import audit

        audit.append(con, actor="pipeline", role="pipeline", action="test", object="keys", home=home)
    template = tmp_path / "template"
    shutil.copytree(home.root, template)
    states = []
    for n, step in enumerate(["transaction", *map(str, range(1, 16))]):
        case = Home(tmp_path / f"case-{step}")
        shutil.copytree(template, case.root)
        code = _rotate_and_kill(forkserver, case, step)
        if code == 0:  # the rotation finished before the n-th rename: every step has been cut
            break
        assert code == -signal.SIGKILL
        states.append(_state(case))
        _reanchor_if_behind(case)
        drop(case, patients=30, seed=100 + n)  # a new drop arrives before anyone resumes
        try:
            process(case)  # the nightly run
        except KeyRingError as exc:  # vault writes are refused while the rotation is pending
            assert "pending" in str(exc) or "store's data was made with key" in str(exc), exc
        else:
            assert states[-1] in ("not started", "finished"), states
        rotation.resume(Haven.open(case, contracts=ContractRegistry(), actor="custodian"))
        assert not rotation.pending(KeyRing(case.keys))
        process(case)  # the next run vaults what was refused
        _check_every_entry_decrypts(case)
        with Store(case).connect(read_only=True) as con:
            vaulted = con.execute("SELECT count(DISTINCT batch_id) FROM vault.batches").fetchone()[0]
            accepted = con.execute("SELECT count(*) FROM governance.batches WHERE status = 'accepted'").fetchone()[0]
        assert vaulted == accepted
    else:
        pytest.fail("the rotation never completed")
    assert {"staged", "committed, not installed", "split pair"} <= set(states), states


# --- the real command line: `safehaven run` as `make run` does it ----------------------------


#: runs the command line with ``registers.os_login`` answering the login given first (a test cannot
#: create OS accounts; the haven reads the account, never ``$LOGNAME``: ``logged_in_as``)
AT_LOGIN = (
    "import sys; from unittest import mock; from safehaven.core import registers; "
    "from safehaven.cli.main import main; login = sys.argv.pop(1); "
    "mock.patch.object(registers, 'os_login', return_value=login).start(); main()"
)


def _cli(
    server: ForkServer, args: list[str], env: dict[str, str], *, login: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The command line in a process of its own (a fork of the warm ``server``, ``tests.forkserver``),
    at the OS account ``login`` (else the test's own)."""
    command = ["-c", AT_LOGIN, login] if login else ["-m", "safehaven.cli.main"]
    return server.run([*command, *args], env=env, cwd=ROOT, timeout=1500)


def _unsealed_private_keys(root: Path, vault_pub: bytes) -> list[str]:
    """Files holding a PEM private key that is not encrypted, or a raw (hex) vault private key."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if b"PRIVATE KEY-----" in data.replace(b"ENCRYPTED PRIVATE KEY-----", b""):
            found.append(str(path))
        for token in set(re.findall(rb"\b[0-9a-f]{64}\b", data)):
            if x25519_public(bytes.fromhex(token.decode())) == vault_pub:
                found.append(str(path))
    return found


@pytest.mark.slow
def test_make_run_leaves_no_unsealed_private_key_and_the_nightly_run_no_identifiable_extract(
    tmp_path: Path, forkserver: ForkServer
) -> None:
    contracts = tmp_path / "data_contracts"
    shutil.copytree(ROOT / "data_contracts", contracts)
    cohort = contracts / "agreements" / "cohort-consent-study.yaml"
    text = cohort.read_text().replace(
        "approval:\n  status: draft",
        'approval:\n  status: approved\n  approver: "Dr Test, Caldicott Guardian"\n  date: 2026-01-02',
    )
    cohort.write_text(text)
    home = Home(tmp_path / "haven")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SAFEHAVEN_HOME": str(home.root),
        "SAFEHAVEN_CONTRACTS": str(contracts),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
        PASSPHRASE_ENV: TEST_PASSPHRASE,
    }
    (tmp_path / "dagster").mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", tmp_path / "dagster" / "dagster.yaml")  # as `make install` does
    run = _cli(forkserver, ["run", "--demo-patients", "200"], env)
    assert "sealed under the key custodian's passphrase" in run.stdout, run.stdout + run.stderr
    assert TEST_PASSPHRASE not in run.stdout + run.stderr
    keyring = KeyRing(home.keys)
    assert _unsealed_private_keys(home.root, keyring.get_public(VAULT).material) == []
    # the approved identifiable agreement: recorded as due, nothing written, no NHS number anywhere
    assert not (home.releases / "cohort-consent-study").exists()
    with Store(home).connect(read_only=True) as con:
        assert [a for a, _ in due.due(con)] == ["cohort-consent-study"]
        numbers = {r[0] for r in con.execute("SELECT nhs_number FROM landing.hospital_episodes_valid").fetchall()}
    assert numbers and leaked_nhs_numbers([home.root], numbers) == {}

    # the custodian, with the passphrase
    made = _cli(forkserver, ["release", "--agreement", "cohort-consent-study"], env)
    assert made.returncode == 0 and "Audited" in made.stdout, made.stdout + made.stderr
    assert not (home.releases / "cohort-consent-study").exists(), "staged for review, nothing delivered yet"
    with Store(home).connect() as con:
        [request] = review.requests(con, agreement_id="cohort-consent-study")
    assert request.rule == review.TWO_REVIEWERS_AND_CUSTODIAN
    for by in REVIEWERS:
        by_login = login_of(by)  # each reviewer at their own login
        approved = _cli(forkserver, ["review", "approve", request.release_id, "--by", by], env, login=by_login)
        assert approved.returncode == 0, approved.stdout + approved.stderr
    assert not (home.releases / "cohort-consent-study").exists(), "the custodian delivers it"
    no_key = _cli(forkserver, ["review", "release", request.release_id, "--by", "V. Keeper, vault custodian"],
                  {**env, PASSPHRASE_ENV: "wrong"})  # fmt: skip
    assert no_key.returncode == 1 and "passphrase does not open" in no_key.stderr, no_key.stdout + no_key.stderr
    delivered = _cli(forkserver, ["review", "release", request.release_id, "--by", "V. Keeper, vault custodian"], env)
    assert delivered.returncode == 0, delivered.stdout + delivered.stderr
    [directory] = list((home.releases / "cohort-consent-study").iterdir())
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in directory.iterdir())
    assert leaked_nhs_numbers([directory], numbers), "the custodian's identifiable extract holds NHS numbers"
    with Store(home).connect(read_only=True) as con:
        assert due.due(con) == []
    refused = _cli(forkserver, ["release", "--agreement", "cohort-consent-study"], {**env, PASSPHRASE_ENV: "wrong"})
    assert refused.returncode == 1 and "passphrase does not open" in refused.stderr
    assert "Traceback" not in refused.stderr
