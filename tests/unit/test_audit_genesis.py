"""A new audit trail's first entry survives ``kill -9`` at every point (``safehaven.core.audit``,
"A new trail's key is installed only once its first entry and anchor exist"; CoP 23d: the
trail is complete and checkable, and a crash is not a breach).

Each case is a real subprocess writing the first entry of a fresh haven's trail, killed with a
real SIGKILL (``tests.crash.harness.arm``) at one point; the next append must go through with no
person involved, and the trail must verify with its key installed and recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safehaven.core import anchors, audit
from safehaven.core.home import Home
from safehaven.core.keys import Key, KeyRing
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


def _rewrite_under_a_planted_key(home: Home, entries: int, keep: int, *, landed: bool) -> bytes:
    """An insider's forgery (store key and shell, no audit key): a trail of ``entries`` cut to its
    first ``keep`` entries re-hashed under a key they stage as ``audit-next.key``, with its genesis
    row fixed, the anchors, the audit key and its record removed. Returns the planted material."""
    planted = os.urandom(32)
    with Store(home).connect() as con:
        for i in range(entries):
            audit.append(con, actor="t", role="pipeline", action="read", object=f"haven.gp_events/{i}", home=home)
        if landed:
            con.execute("CREATE TABLE landing.gp_events AS SELECT 'A81001' AS practice_code")
        kept = con.execute(audit._SELECT + " WHERE seq <= ? ORDER BY seq", [keep]).fetchall()
        rows = [audit._row_entry(row) for row in kept]
        con.execute(f"DELETE FROM {audit.TABLE}")
        prev = audit.GENESIS
        for entry in rows:
            fields = dict(vars(entry), prev_hash=prev)
            fields["entry_hash"] = prev = audit.entry_hash(Key(audit.KEY_PURPOSE, planted), fields)
            con.execute(
                f"INSERT INTO {audit.TABLE} VALUES (?, CAST(? AS TIMESTAMPTZ), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [fields["seq"], audit._iso(fields["at"]), *[fields[c] for c in audit._COLUMNS[2:]]],
            )
        first = con.execute(f"SELECT entry_hash FROM {audit.TABLE} WHERE seq = 1").fetchone()[0]
        con.execute(f"UPDATE {audit.GENESIS_TABLE} SET entry_hash = ?", [first])
    anchors.head_path(home).unlink()
    anchors.history_path(home).unlink()
    keyring = KeyRing(home.keys)
    keyring.path(audit.KEY_PURPOSE).unlink()
    manifest = home.keys / "keyring.json"
    manifest.write_text(
        json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != audit.KEY_PURPOSE})
    )
    keyring.write(audit.GENESIS_KEY, planted, record=False)
    return planted


@pytest.mark.parametrize(("entries", "keep", "landed"), [(10, 6, False), (10, 1, True)], ids=["past entry 1", "data"])
def test_a_staged_key_is_never_adopted_for_a_log_that_is_not_a_new_trail(
    home: Home, entries: int, keep: int, landed: bool
) -> None:
    """A genesis is completed only for a new trail (CoP 23d): the log holds entry 1 alone and
    nothing shows the haven was used before (no audit key on record, no data in the store). A key
    staged after the log was rewritten under it is not installed: the trail is refused, naming
    the missing audit key, until the original key is restored."""
    planted = _rewrite_under_a_planted_key(home, entries, keep, landed=landed)
    with Store(home).connect() as con:
        result = audit.verify(con, home)
        assert not result.ok and result.kind == "key" and "is missing" in result.reason
        with pytest.raises(audit.AuditTrailBroken, match="audit key"):
            audit.begin_run(con, home, actor="t", job="nightly", run_id="0" * 32)
        with pytest.raises(audit.AuditTrailBroken, match="audit key"):
            audit.append(con, actor="t", role="pipeline", action="read", object="haven.gp_events", home=home)
    keyring = KeyRing(home.keys)
    assert not keyring.exists(audit.KEY_PURPOSE) and not keyring.recorded(audit.KEY_PURPOSE)
    assert keyring.get(audit.GENESIS_KEY).material == planted  # left for the custodian to judge
