"""Crash matrix (issue 17): ``kill -9`` of ``safehaven run`` at points over every stage, each
followed by a plain ``safehaven run`` that succeeds with no manual step, in bounded time, and
whose landed, haven, vault, published and release results equal a run with no crash.

Each case is a real subprocess killed with a real SIGKILL (``tests.crash.harness``) in a real
Dagster instance configured by ``deploy/dagster.yaml`` (one slot in the ``safehaven_store``
pool: without recovery the next run waits for the dead run's slot forever). All homes share
the no-crash run's key files, so pseudonyms and releases are comparable byte for byte.

The recovery run is ``safehaven run`` launched through the instance's queue (as ``make run``
and the schedule run it: the dead run's tag limit and pool slot both stand in its way) at the
points marked :data:`LAUNCHED`, one of each kind (between runs, inside an intake step, inside
a nightly step); at the others it is ``safehaven run --in-process`` on the same instance, which
recovers through the same code (``assets.runner.recover``, before anything runs) and then runs
the night in its own process, 13 s instead of 32 s here: five launched worker processes each
import Dagster and load the definitions. The run with no crash that every case is compared with
is an in-process one too, so each launched recovery is also checked against the other way of
running a night.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import duckdb
import pytest

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.tools import synthetic
from tests.conftest import TEST_PASSPHRASE, crash_group
from tests.forkserver import ForkServer
from tests.governance_helpers import adopt_project_agreements

ROOT = Path(__file__).resolve().parents[2]
PATIENTS = 300
#: a recovery run must finish within this (a run takes well under a minute on this population)
RECOVERY_LIMIT_SECONDS = 420
CONNECT = "safehaven.core.store:Store.connect"

#: (name, target, call number, when): kill points over every stage and between the runs of a
#: night. Store connections of ``safehaven run --in-process`` on this drop, in order: 1-2 the
#: command's own set-up; per collection (gp_events, hospital_episodes, objections, social_care)
#: its intake run's set-up (3, 5, 7, 9) and intake step (4, 6, 8, 10); the nightly run's set-up
#: 11, then its steps: objection register 12, objections vault 13, feed 14, havens 15-17, vaults
#: 18-20, the first count 21, objection rates 22, releases and counts 23-30, protected outputs
#: 31-34, publication 35 (printed by a trace of ``Store.connect``, ``tests.crash.harness``).
POINTS = [
    # the first landing step's work, inside its store connection
    ("ingest: inside the first landing step", "safehaven.intake.ingest:ingest_collection", 1, "before"),
    ("ingest: a file landed and committed, not yet shredded", "safehaven.intake.ingest:shred_file", 2, "before"),
    ("validate: inside the first validation", "safehaven.intake.validation:validate_collection", 1, "before"),
    ("intake: the second collection's intake run starting", CONNECT, 5, "inside"),
    ("objections: inside the objection register step", CONNECT, 12, "inside"),
    ("pseudonymise: inside the first haven step", CONNECT, 15, "inside"),
    ("vault: inside the first content collection's vault step", CONNECT, 18, "inside"),
    ("counts: inside the first counting step", CONNECT, 21, "inside"),
    ("releases: inside the linked release step", CONNECT, 30, "inside"),
    ("publish: staging written, published.duckdb not yet", "safehaven.publish.publication:_write_db", 1, "before"),
    ("publish: files in place, release not yet recorded", "safehaven.publish.publication:record_release", 1, "before"),
]
#: the points killed inside a step's store connection, so the dead run holds the store pool's only slot
IN_A_STEP = {name for name, *_ in POINTS if name.split(":")[0] not in ("intake", "publish")}
#: the points whose recovery run is launched through the instance's queue (module docstring)
LAUNCHED = {
    "intake: the second collection's intake run starting",
    "ingest: inside the first landing step",
    "counts: inside the first counting step",
}


def _env(home: Path, dagster_home: Path) -> dict[str, str]:
    """The run's environment; the custodian's passphrase creates the vault pair on the first run."""
    return {
        **os.environ,
        "SAFEHAVEN_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "PYTHONPATH": str(ROOT),
        PASSPHRASE_ENV: TEST_PASSPHRASE,
    }


def _run(server: ForkServer, env: dict[str, str], *harness: str, launched: bool = True) -> subprocess.CompletedProcess:
    """A plain ``safehaven run`` (launched through the instance, or ``--in-process``), or one the
    harness kills: that one runs the job in its own process so the kill lands inside a store step.
    Each is a process of its own, forked from a warm interpreter (``tests.forkserver``)."""
    plain = ["-c", "from safehaven.cli.main import main; main()"]
    prefix = ["-m", "tests.crash.harness", *harness, "--"] if harness else plain
    in_process = ["--in-process"] if harness or not launched else []
    return server.run([*prefix, "run", "--no-demo", *in_process], env=env, cwd=ROOT, timeout=RECOVERY_LIMIT_SECONDS)


def _prepare(root: Path, keys: Path | None) -> tuple[Home, Path]:
    home = Home(root / "haven").ensure()
    dagster_home = root / "dagster_home"
    dagster_home.mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")  # as `make install` does
    if keys is not None:  # the same pseudonym and vault keys, so results compare equal
        shutil.rmtree(home.keys)
        shutil.copytree(keys, home.keys)
        _fresh_audit_key(home)
    synthetic.generate(home.incoming, patients=PATIENTS, seed=7)
    adopt_project_agreements(home)  # `run --no-demo` adopts nothing: the governance lead does it first
    return home, dagster_home


def _fresh_audit_key(home: Home) -> None:
    """A new haven starts its own audit trail: an audit key without its log is refused as a
    truncated trail (``safehaven.core.audit``), so the copied ring leaves the audit key out."""
    (home.keys / "audit.key").unlink(missing_ok=True)
    ring_file = home.keys / "keyring.json"
    ring = json.loads(ring_file.read_text())
    ring.pop("audit", None)
    ring_file.write_text(json.dumps(ring, indent=2))


def _table_digest(con: duckdb.DuckDBPyConnection, relation: str) -> tuple[int, str]:
    """Row count and an order-free digest of the rows (timestamps excluded: they say when, not what)."""
    cols = [d[0] for d in con.execute(f"SELECT * FROM {relation} LIMIT 0").description]
    types = [str(d[1]) for d in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]
    kept = [f'"{c}"' for c, t in zip(cols, types, strict=True) if not t.startswith("TIMESTAMP")]
    row = con.execute(f"SELECT count(*), sum(hash({', '.join(kept)}))::VARCHAR FROM {relation}").fetchone()
    return int(row[0]), str(row[1])


def snapshot(home: Home) -> dict[str, object]:
    """What a run produced, zone by zone (vault entries are counted: they are freshly encrypted)."""
    out: dict[str, object] = {}
    with Store(home).connect(read_only=True) as con:
        tables = con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_catalog = 'store' "
            "AND table_schema IN ('landing', 'haven', 'vault', 'release', 'published') "
            "AND table_type = 'BASE TABLE' ORDER BY 1, 2"
        ).fetchall()
        for schema, table in tables:
            if schema == "vault":
                out[f"{schema}.{table}"] = con.execute(f'SELECT count(*) FROM {schema}."{table}"').fetchone()[0]
            else:
                out[f"{schema}.{table}"] = _table_digest(con, f'{schema}."{table}"')
        out["batches"] = con.execute(
            "SELECT list(batch_id ORDER BY batch_id), sum(rows) FROM governance.batches"
        ).fetchone()
    for path in sorted(home.published.glob("*.csv")):
        out[f"published/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    plain = duckdb.connect()
    for path in sorted(home.published.glob("*.parquet")):
        out[str(path.relative_to(home.root))] = _table_digest(plain, f"read_parquet('{path}')")
    for agreement in sorted(p for p in home.releases.iterdir() if p.is_dir()):
        # the current release of each agreement: a run that redoes a finished release stage
        # issues the same extract again under the next release number
        current = max(agreement.glob(f"{agreement.name}-r*"), default=None)
        for path in sorted(current.glob("*.parquet")) if current else []:
            out[f"releases/{agreement.name}/current/{path.name}"] = _table_digest(plain, f"read_parquet('{path}')")
    out["published files"] = sorted(p.name for p in home.published.iterdir())
    return out


def _leftovers(home: Home) -> list[str]:
    """Anything a crash could leave for a person to clean up (release requests waiting for
    review in ``staging/releases/`` are not leftovers: they wait for the reviewers)."""
    return [
        *(str(p) for p in home.incoming.rglob("*") if p.is_file()),
        *(str(p) for p in home.published.glob(".staging-*")),
        *(str(p) for p in home.staging.iterdir() if p.name != "releases"),
        *(str(p) for p in (home.store_dir / "runs").glob("*.lock")),
    ]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, forkserver: ForkServer) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("no_crash")
    home, dagster_home = _prepare(root, None)
    done = _run(forkserver, _env(home.root, dagster_home), launched=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return home.keys, snapshot(home)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "target", "nth", "when"),
    [pytest.param(*point, id=point[0], marks=crash_group(i)) for i, point in enumerate(POINTS)],
)
def test_after_a_kill_9_a_plain_run_recovers_and_equals_a_run_with_no_crash(
    baseline: tuple[Path, dict[str, object]],
    forkserver: ForkServer,
    tmp_path: Path,
    name: str,
    target: str,
    nth: int,
    when: str,
) -> None:
    keys, expected = baseline
    home, dagster_home = _prepare(tmp_path, keys)
    env = _env(home.root, dagster_home)

    killed = _run(forkserver, env, target, str(nth), when)
    assert killed.returncode == -9, f"{name}: the run was not killed where asked\n{killed.stderr[-2000:]}"

    started = time.monotonic()
    again = _run(forkserver, env, launched=name in LAUNCHED)
    assert again.returncode == 0, f"{name}: the next run failed\n{again.stdout[-2000:]}{again.stderr[-3000:]}"
    assert time.monotonic() - started < RECOVERY_LIMIT_SECONDS
    assert "Step blocked by limit for pool" not in again.stderr
    assert "recovered: run" in again.stdout  # the dead run is marked failed
    if name in IN_A_STEP:  # the dead run held the store pool's only slot
        assert "pool slot(s) freed" in again.stdout

    assert snapshot(home) == expected
    assert _leftovers(home) == []
