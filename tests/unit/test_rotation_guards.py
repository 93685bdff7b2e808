"""Key rotation and runs (issue 17): rotation refuses while a run is alive, and a recipient
never sees a crosswalk for a haven key that did not become current (real ``kill -9``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from safehaven.context import Haven
from safehaven.core import runs
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, agreement_key
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import rotation
from safehaven.protect.optouts import MEMBERS
from safehaven.protect.optouts import ensure_tables as ensure_optout_tables
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
rotation.rotate(Haven.open(home, contracts=ContractRegistry(), keyring=custodian, actor="t"), "haven")
"""


def _as_t(home: Home) -> Haven:
    """The pipeline's context (no custodian) as actor ``t``, under the project's contracts."""
    return Haven.open(home, contracts=ContractRegistry(), actor="t")


@pytest.fixture
def haven_home(home: Home) -> Home:
    """A populated haven with five people released to agreement ``study-a`` (so it gets a crosswalk)."""
    populated(home)
    agreement_key(KeyRing(home.keys), "study-a")
    with Store(home).connect() as con:
        ensure_optout_tables(con)
        some = [r[0] for r in con.execute("SELECT DISTINCT pid FROM haven.hospital_episodes LIMIT 5").fetchall()]
        con.executemany(f"INSERT INTO {MEMBERS} VALUES ('r1', 'study-a', ?, now())", [[p] for p in some])
    return home


def _crosswalks(home: Home) -> list[Path]:
    return sorted(home.releases.glob("*/rekey/*.csv"))


def _rotate_and_die(home: Home, kill_before: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", ROTATE_AND_DIE, str(home.root), kill_before], env=env, timeout=600)
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
