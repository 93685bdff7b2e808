"""A new audit trail's first entry survives ``kill -9`` at every point (``safehaven.core.audit``,
"A new trail's key is installed only once its first entry and anchor exist"; CoP 23d: the
trail is complete and checkable, and a crash is not a breach).

Each case is a real subprocess writing the first entry of a fresh haven's trail, killed with a
real SIGKILL (``tests.crash.harness.arm``) at one point; the next append must go through with no
person involved, and the trail must verify with its key installed and recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from safehaven.core import audit
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store

ROOT = Path(__file__).resolve().parents[2]

FIRST_ENTRY_AND_DIE = """
import sys
from pathlib import Path
from tests.crash.harness import arm
arm(sys.argv[2], int(sys.argv[3]), "before")
from safehaven.core import audit
from safehaven.core.home import Home
from safehaven.core.store import Store
home = Home(Path(sys.argv[1])).ensure()
with Store(home).connect() as con:
    audit.append(con, actor="t", role="pipeline", action="pipeline.run", object="job:nightly")
"""

#: (what the kill leaves, target, its call number, entries the log holds after the next append);
#: ``KeyRing._record`` is called first for the store key, then for the audit key
POINTS = [
    ("key staged, entry 1 not committed", "safehaven.core.audit:_insert", 1, 1),
    ("entry 1 committed, not anchored", "safehaven.core.audit:_anchor_everywhere", 1, 2),
    ("anchor history written, head file not", "safehaven.core.anchors:write_head", 1, 2),
    ("entry 1 anchored, key not installed", "safehaven.core.audit:_install_genesis_key", 1, 2),
    ("key file installed, not recorded in the key ring", "safehaven.core.keys:KeyRing._record", 2, 2),
    ("key installed, staged copy not shredded", "safehaven.core.keys:KeyRing.discard", 1, 2),
]


def _kill_first_entry(home: Home, target: str, nth: int = 1) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FIRST_ENTRY_AND_DIE, str(home.root), target, str(nth)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -9, f"not killed where asked:\n{done.stderr[-2000:]}"


@pytest.mark.parametrize(("left", "target", "nth", "entries"), POINTS, ids=[p[0] for p in POINTS])
def test_a_first_entry_killed_at_any_point_is_completed_by_the_next_append(
    tmp_path: Path, left: str, target: str, nth: int, entries: int
) -> None:
    home = Home(tmp_path / "haven")
    _kill_first_entry(home, target, nth)
    with Store(home).connect() as con:
        audit.append(con, actor="t", role="pipeline", action="pipeline.run", object="job:nightly")
        result = audit.verify(con, home)
        assert result.ok, f"{left}: {result.reason}"
        assert len(audit.entries_for(con, object_like="job:nightly")) == entries
    keyring = KeyRing(home.keys)
    assert keyring.recorded(audit.KEY_PURPOSE) and keyring.exists(audit.KEY_PURPOSE)
    assert not keyring.exists(audit.GENESIS_KEY), "the staged copy is shredded"


def test_a_staged_key_the_log_does_not_verify_under_is_never_installed(tmp_path: Path) -> None:
    """Only the key entry 1 was written with completes the genesis: another staged key (swapped
    in after the crash) is not installed, and the trail is refused as before, naming the key."""
    home = Home(tmp_path / "haven")
    _kill_first_entry(home, "safehaven.core.audit:_anchor_everywhere")
    keyring = KeyRing(home.keys)
    keyring.discard(audit.GENESIS_KEY)
    keyring.write(audit.GENESIS_KEY, os.urandom(32), record=False)
    with Store(home).connect() as con:
        with pytest.raises(audit.AuditTrailBroken, match="audit key"):
            audit.begin_run(con, home, actor="t", job="nightly", run_id="0" * 32)
    assert not keyring.exists(audit.KEY_PURPOSE) and not keyring.recorded(audit.KEY_PURPOSE)


def test_audit_verify_completes_an_interrupted_genesis_and_records_no_breach(tmp_path: Path) -> None:
    """``safehaven audit verify`` (and so every audited command's check) after the kill: the trail
    verifies, the key is installed, and no breach is recorded for a crash."""
    home = Home(tmp_path / "haven")
    _kill_first_entry(home, "safehaven.core.audit:_anchor_everywhere")
    done = subprocess.run(
        [sys.executable, "-c", "from safehaven.cli.main import main; main()", "audit", "verify"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "SAFEHAVEN_HOME": str(home.root)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "breach" not in (done.stdout + done.stderr).lower()
    keyring = KeyRing(home.keys)
    assert keyring.recorded(audit.KEY_PURPOSE) and not keyring.exists(audit.GENESIS_KEY)
