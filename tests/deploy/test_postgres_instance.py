"""The production instance on a real PostgreSQL server (issue 21).

The topology is the one of deploy/production/docker-compose.yml, as processes on this machine:
the code location is a gRPC server (``dagster code-server start``), the daemon
(``dagster-daemon run``) loads deploy/production/workspace.yaml, and the instance is
deploy/production/dagster.yaml itself, pointed at the server through DAGSTER_PG_*. The
nightly job is submitted with ``dagster job launch``, which only queues it: the daemon's
QueuedRunCoordinator dequeues it and the code server's run worker executes it, not this
process. Then PostgreSQL is asked for the run, its events and its asset check evaluations,
and every table of the instance database is scanned for the seeded NHS numbers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from safehaven.core.home import Home
from safehaven.tools import synthetic
from tests.conftest import NHS_LIKE, leaked_nhs_numbers, seeded_nhs_numbers, with_vault_keys
from tests.deploy.postgres import PostgresServer, free_port, start_server
from tests.forkserver import ForkServer
from tests.governance_helpers import adopt_project_agreements

REPO = Path(__file__).resolve().parents[2]
PRODUCTION = REPO / "deploy" / "production"
PATIENTS = 300
RUN_TIMEOUT_S = 900
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.deploy
IN_CI = bool(os.environ.get("CI"))  # .ci/run installs PostgreSQL and the [deploy] extra: never skip there
if not IN_CI:
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is installed by `make install` (extra [deploy])")


@dataclass
class DaemonRun:
    server: PostgresServer
    run_id: str
    seeded: set[str]
    home: Home
    dagster_home: Path
    logs: Path


def _wait_for(predicate, timeout: float, what: str, procs: list[subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args[:3]} exited ({proc.returncode}) waiting for {what}; see {logs}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.5)


def _query(server: PostgresServer, sql: str, params: tuple = ()) -> list[tuple]:
    con = server.connect("dagster")
    try:
        with con.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        con.close()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when this test process dies, so no server outlives it."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


#: how long a server may take to stop after SIGTERM before it is killed (alone they stop within a
#: second or two; under a loaded machine one has hung for the whole wait, a minute, now and then)
STOP_GRACE_S = 15


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every server at once, then wait for each (killing one that outlives the grace)."""
    running = [proc for proc in reversed(procs) if proc.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def daemon_run(tmp_path_factory: pytest.TempPathFactory, forkserver: ForkServer) -> Iterator[DaemonRun]:
    try:
        server = start_server()
    except RuntimeError as exc:
        if IN_CI:
            raise
        pytest.skip(f"no PostgreSQL server could be started: {exc}")
    root = tmp_path_factory.mktemp("production")
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(PRODUCTION / "dagster.yaml", dagster_home / "dagster.yaml")
    logs = root / "logs"
    logs.mkdir()
    # set up as the key custodian sets up a new haven before its first run (keys init-vault)
    home = with_vault_keys(Home(root / "haven").ensure())
    synthetic.generate(home.incoming, patients=PATIENTS, seed=11)
    adopt_project_agreements(home)  # the governance lead's decisions on the project's agreements
    seeded = seeded_nhs_numbers(home.incoming)
    procs: list[subprocess.Popen] = []
    try:
        server.create_database("dagster")
        code_port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "DAGSTER_HOME": str(dagster_home),
            "SAFEHAVEN_HOME": str(home.root),
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(server.port),
            "DAGSTER_PG_USER": server.user,
            "DAGSTER_PG_PASSWORD": server.password,
            "DAGSTER_PG_DB": "dagster",
            "SAFEHAVEN_CODE_HOST": "127.0.0.1",
            "SAFEHAVEN_CODE_PORT": str(code_port),
        }
        workspace = ["-w", str(PRODUCTION / "workspace.yaml")]

        def spawn(name: str, *args: str) -> subprocess.Popen:
            out = (logs / f"{name}.log").open("wb")
            proc = subprocess.Popen(
                args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
            procs.append(proc)
            return proc

        def cli(name: str, *args: str) -> subprocess.CompletedProcess[str]:
            """``dagster *args``, as a fork of the warm server (``tests.forkserver``: Dagster is
            imported once, not by each of the ten or so commands)."""
            done = forkserver.run(["-m", "dagster", *args], env=env, cwd=REPO, timeout=300)
            (logs / f"{name}.log").write_text(done.stdout + done.stderr)
            return done

        def cli_ok(name: str, *args: str) -> None:
            done = cli(name, *args)
            assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

        spawn(
            "code-server",
            str(BIN / "dagster"),
            "code-server",
            "start",
            "-h",
            "127.0.0.1",
            "-p",
            str(code_port),
            "-m",
            "assets.definitions",
            "-d",
            str(REPO),
            "--location-name",
            "safehaven",
        )

        def code_server_up() -> bool:
            probe = cli("grpc-health-check", "api", "grpc-health-check", "-p", str(code_port), "-h", "127.0.0.1")
            return probe.returncode == 0

        _wait_for(code_server_up, 300, "the code location's gRPC server", procs, logs)
        # The sensor on incoming/ and the 02:00 schedule are on by default; switch them off so
        # that the only run is the one submitted below.
        cli_ok("sensor-stop", "sensor", "stop", "incoming_sensor", *workspace)
        cli_ok("schedule-stop", "schedule", "stop", "nightly_0200_london", *workspace)
        # A night: each collection's intake job (every drop waiting), then the nightly job, queued
        # in that order; the queue's one-writer limit runs them one at a time, first come first.
        night = [
            (f"intake_{c}", str(uuid.uuid4())) for c in ("gp_events", "hospital_episodes", "objections", "social_care")
        ]
        run_id = str(uuid.uuid4())
        for job, rid in [*night, ("nightly", run_id)]:
            cli_ok(f"launch-{job}", "job", "launch", *workspace, "-l", "safehaven", "-j", job, "--run-id", rid)
        status = _query(server, "SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert status == [("QUEUED",)], f"the launch must only queue the run, got {status}"

        spawn("daemon", str(BIN / "dagster-daemon"), "run", *workspace)

        def finished() -> bool:
            rows = _query(server, "SELECT status FROM runs WHERE run_id = %s", (run_id,))
            return rows[0][0] in ("SUCCESS", "FAILURE", "CANCELED")

        _wait_for(finished, RUN_TIMEOUT_S, "the daemon to dequeue and finish the night's runs", procs, logs)
        intake = _query(server, "SELECT status FROM runs WHERE run_id = ANY(%s)", ([rid for _, rid in night],))
        assert intake == [("SUCCESS",)] * len(night), intake
        yield DaemonRun(server, run_id, seeded, home, dagster_home, logs)
    finally:
        _stop_all(procs)
        server.stop()


def _event_types(run: DaemonRun) -> dict[str, int]:
    rows = _query(
        run.server,
        "SELECT dagster_event_type, count(*) FROM event_logs WHERE run_id = %s GROUP BY 1",
        (run.run_id,),
    )
    return {t: n for t, n in rows if t}


def test_the_run_went_through_the_daemons_queue_and_succeeded(daemon_run: DaemonRun) -> None:
    import dagster as dg

    (status, job_name), *_ = _query(
        daemon_run.server, "SELECT status, pipeline_name FROM runs WHERE run_id = %s", (daemon_run.run_id,)
    )
    assert (status, job_name) == ("SUCCESS", "nightly"), (daemon_run.logs / "daemon.log").read_text()[-3000:]
    events = _event_types(daemon_run)
    # queued by `dagster job launch`, launched (STARTING) by the daemon, then executed
    for event in (
        dg.DagsterEventType.RUN_ENQUEUED,
        dg.DagsterEventType.RUN_STARTING,
        dg.DagsterEventType.RUN_START,
        dg.DagsterEventType.RUN_SUCCESS,
    ):
        assert events.get(event.value) == 1, (event, events)
    assert "Launched 1 runs" in (daemon_run.logs / "daemon.log").read_text()
    # the run worker was a process of the code server, launched on the daemon's request
    engine = _query(
        daemon_run.server,
        "SELECT event FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ENGINE_EVENT'",
        (daemon_run.run_id,),
    )
    assert any("Started process for run" in body for (body,) in engine), engine


def test_every_asset_of_the_job_is_recorded_in_postgres(daemon_run: DaemonRun) -> None:
    """Every stage asset materialised; a release asset whose agreement is not due is observed."""
    from assets.definitions import build_definitions

    job = build_definitions().resolve_job_def("nightly")
    expected = {key.to_string() for key in job.asset_layer.executable_asset_keys}

    def keys_of(event_type: str) -> set[str]:
        rows = _query(
            daemon_run.server,
            "SELECT DISTINCT asset_key FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
            (daemon_run.run_id, event_type),
        )
        return {key for (key,) in rows}

    materialised = keys_of("ASSET_MATERIALIZATION")
    observed = keys_of("ASSET_OBSERVATION")
    assert materialised | observed == expected
    assert {k for k in expected if not k.startswith('["release"')} <= materialised
    assert (daemon_run.home.published / "gp_activity.csv").exists()


def test_asset_check_evaluations_are_in_postgres(daemon_run: DaemonRun) -> None:
    executions = _query(
        daemon_run.server,
        "SELECT asset_key, check_name, execution_status FROM asset_check_executions WHERE run_id = %s",
        (daemon_run.run_id,),
    )
    evaluations = _event_types(daemon_run).get("ASSET_CHECK_EVALUATION", 0)
    assert len(executions) >= 10
    assert len(executions) == evaluations
    statuses = {status for (_, _, status) in executions}
    assert statuses <= {"SUCCEEDED", "FAILED"}, statuses
    assert "SUCCEEDED" in statuses


def _nhs_numbers_in(text: str, seeded: set[str]) -> set[str]:
    return {re.sub(r"[^0-9]", "", m.decode()) for m in NHS_LIKE.findall(text.encode())} & seeded


def test_no_seeded_nhs_number_reached_postgres(daemon_run: DaemonRun) -> None:
    seeded = daemon_run.seeded
    assert len(seeded) > 100
    sample = sorted(seeded)[0]
    assert _nhs_numbers_in(f"a {sample[:3]} {sample[3:6]} {sample[6:]} b", seeded) == {sample}, "the scan must see one"
    tables = _query(
        daemon_run.server,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    assert {"runs", "event_logs", "asset_check_executions", "instigators", "jobs"} <= {t for (t,) in tables}
    scanned = 0
    leaks: dict[str, int] = {}
    for (table,) in tables:
        rows = _query(daemon_run.server, f'SELECT t::text FROM "{table}" t')
        text = "\n".join(r for (r,) in rows)
        scanned += len(text)
        found = _nhs_numbers_in(text, seeded)
        if found:
            leaks[table] = len(found)
    assert scanned > 100_000, "the event log of a whole nightly run should hold far more text than this"
    assert leaks == {}


def test_no_seeded_nhs_number_in_dagster_home_or_process_logs(daemon_run: DaemonRun) -> None:
    assert leaked_nhs_numbers([daemon_run.dagster_home, daemon_run.logs], daemon_run.seeded) == {}
    # compute logs are off in production: nothing of a step's stdout/stderr is kept
    assert not list(daemon_run.dagster_home.rglob("*.out")) and not list(daemon_run.dagster_home.rglob("*.err"))
