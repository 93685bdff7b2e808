"""Run intake and the nightly job and summarise them (used by ``safehaven run`` / ``make run`` and the tests).

A night is the intake job of every collection with something waiting in ``incoming/`` (each
without a partition: every drop waiting, each drop's partition recorded), then the nightly job
(``assets.automation``), one after the other, each to the end. Two ways to run, one summary:

* ``launch_nightly``: a real run of the code location ``safehaven`` (workspace.yaml) through
  the instance: it is submitted to the instance's run coordinator, so the run queue and its
  one-writer limit apply; when no daemon serves the queue this process dequeues it itself,
  with Dagster's own queued-run coordinator; the run is launched by the instance's run
  launcher in its own process, and followed here to the end. The UI lists it under the
  nightly job with its origin, and it can be re-executed from there.
* ``run_nightly``: the same job in this process, for tests on a temporary instance.

Either way the summary is read back from the instance's event log: counts, check verdicts
and reasons, never values. The haven's home reaches the run as resource configuration,
not through the environment.

Self-healing (the project's "no human after a crash" rule): before a run starts,
``recover`` deals with what a crashed run left behind, and says what it did:

* A run whose process died (``kill -9``, power loss) stays ``STARTED`` in Dagster's run
  storage and keeps the ``safehaven_store`` pool slot of the step it was in, so every later
  run would wait for that slot forever. A run of this haven is known dead when its
  liveness lock (``safehaven.core.runs``) is no longer held: it is marked failed and its
  slots are freed. A finished run (e.g. one the run monitoring daemon marked failed) that
  still holds slots has them freed too. A run with no liveness lock here is left to
  Dagster's run monitoring (``deploy/dagster.yaml``).
* Staging folders of an interrupted publication are removed (``safehaven.publish.publication``).
* Half-done stages need nothing more: each stage commits in the store's transactions and
  is idempotent, so the new run completes or redoes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG as PARTITION_RANGE_END_TAG,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_START_TAG as PARTITION_RANGE_START_TAG,
)
from dagster._core.storage.tags import PARTITION_NAME_TAG as PARTITION_TAG

from assets.automation import INTAKE_PREFIX, NIGHTLY
from safehaven.core import runs
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.validation import collections_pending

LOCATION = "safehaven"
WORKSPACE = Path(__file__).resolve().parents[1] / "workspace.yaml"
#: how often a launched run is polled for progress (seconds): each poll reads the run's status and
#: only the events since the last poll, so a short wait costs little and the end of a run (each of
#: the night's runs) is noticed within a tenth of a second rather than half a second
POLL_SECONDS = 0.1
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
DEAD_RUN_MESSAGE = (
    "the run's process ended without finishing (killed or crashed); marked failed by the next safehaven run"
)
log = logging.getLogger(__name__)
_STEP_END = (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.STEP_SKIPPED)


@dataclass
class StageSummary:
    asset: str
    rows_in: int | None
    rows_out: int | None
    checks_failed: list[str]
    #: failed checks of WARN severity (e.g. an outlier objection rate): reported, not fatal
    checks_warned: list[str] = field(default_factory=list)
    #: how many checks ran on the asset in this run (0: it has none, or none ran)
    checks_passed: int = 0
    #: a word for the reader: why a release did nothing, what an output's rows are
    note: str = ""


#: the run's console shows errors only: progress and the summary are this module's job, and
#: every event is kept in the instance's event log (the UI and ``--verbose`` show it)
QUIET_CONSOLE = {"console": {"config": {"log_level": "ERROR"}}}


def haven_run_config(home: Home, quiet: bool = False) -> dict[str, object]:
    """The run configuration that names the haven's home (and its write-once audit anchor
    target and the store's memory limit, when the home has them) for the resource; other fields
    keep the resource's values."""
    haven: dict[str, object] = {"home": str(home.root)}
    if home.audit_worm is not None:
        haven["audit_worm_dir"] = str(home.audit_worm)
    if home.memory_limit is not None:
        haven["memory_limit"] = home.memory_limit
    config: dict[str, object] = {"resources": {"haven": {"config": haven}}}
    if quiet:
        config["loggers"] = QUIET_CONSOLE
    return config


def _free_run(instance: dg.DagsterInstance, home: Home, run_id: str) -> str | None:
    """Mark one dead run failed and free its slots; what was done, or None if it is alive/not ours."""
    record = instance.get_run_record_by_id(run_id)
    alive = runs.is_alive(home, run_id)
    if record is not None and record.dagster_run.status not in FINISHED:
        if alive is not False:
            return None  # alive, or not a run of this haven: left to run monitoring
        instance.report_run_failed(record.dagster_run, DEAD_RUN_MESSAGE)
    elif alive:
        return None
    freed = instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    runs.forget(home, run_id)
    return f"run {run_id}: its process had died; marked failed, {freed or 0} pool slot(s) freed"


def recover(instance: dg.DagsterInstance, home: Home) -> list[str]:
    """Free what crashed runs left behind before a new run starts (module docstring)."""
    done = []
    candidates = {p.stem for p in runs.runs_dir(home).glob("*.lock")} if runs.runs_dir(home).is_dir() else set()
    if instance.event_log_storage.supports_global_concurrency_limits:
        candidates |= instance.event_log_storage.get_concurrency_run_ids()
    for run_id in sorted(candidates):
        if runs.RUN_ID.fullmatch(run_id) and (line := _free_run(instance, home, run_id)):
            done.append(line)
    for stale in sorted(home.staging.glob("publish-*")) if home.staging.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"removed the staging folder of an interrupted publication ({stale.name})")
    return done


def _recover(instance: dg.DagsterInstance, home: Home, report: Callable[[str], None] | None) -> None:
    for line in recover(instance, home.ensure()):
        (report or log.warning)(line)


def intake_waiting(home: Home, collection: str) -> bool:
    """Whether a collection's intake has something to do: an entry in its ``incoming/`` folder, or a
    folder that is not a plain folder (landing refuses it, so it must run)."""
    folder = home.incoming_for(collection)
    if not os.path.lexists(folder):
        return False
    if folder.is_symlink() or not folder.is_dir():
        return True
    return any(True for _ in folder.iterdir())


def _pending(home: Home) -> set[str]:
    """The collections with a batch landed and not validated (``collections_pending``)."""
    if not home.store_file.exists():
        return set()
    with Store(home).connect(read_only=True) as con:
        return collections_pending(con)


def night_jobs(home: Home, job_names: list[str]) -> list[str]:
    """The jobs of one night, in order: the intake jobs (of ``job_names``) of the collections with
    something waiting in ``incoming/`` or a batch landed and not validated, then nightly."""
    pending = _pending(home)
    intake = sorted(n for n in job_names if n.startswith(INTAKE_PREFIX))
    due = [
        n
        for n in intake
        if n.removeprefix(INTAKE_PREFIX) in pending or intake_waiting(home, n.removeprefix(INTAKE_PREFIX))
    ]
    return [*due, NIGHTLY]


def run_nightly(
    home: Home,
    instance: dg.DagsterInstance | None = None,
    report: Callable[[str], None] | None = None,
    months: tuple[str, str] | None = None,
) -> tuple[bool, list[StageSummary]]:
    """Recover from earlier crashes, then run one night (module docstring) in this process;
    success and per-asset counts. What recovery did goes to ``report``; ``months`` as for
    :func:`launch_nightly` (the nightly job only)."""
    # imported here: ``launch_nightly`` (``safehaven run``) never needs this process's definitions
    # (the code location's server and the run's worker build their own), so it does not build them
    from assets.definitions import build_definitions

    defs = build_definitions()
    instance = instance or dg.DagsterInstance.ephemeral()
    _recover(instance, home, report)
    ok, stages = True, []
    for name in night_jobs(home, [job.name for job in defs.resolve_all_job_defs()]):
        result = defs.resolve_job_def(name).execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config=haven_run_config(home, quiet=True),
            tags=month_tags(months) if name == NIGHTLY else {},
        )
        run_ok, run_stages = summarise_run(instance, result.run_id)
        ok, stages = ok and run_ok and result.success, stages + run_stages
    return ok, stages


def summarise_run(instance: dg.DagsterInstance, run_id: str) -> tuple[bool, list[StageSummary]]:
    """Per-asset counts and check verdicts of one run, from the instance's event log."""
    summaries: dict[str, StageSummary] = {}
    failed = False
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            summaries[f"{event.step_key} (step)"] = StageSummary(
                f"{event.step_key} (step)", None, None, ["step failed"]
            )
            failed = True
        else:
            failed |= _record(summaries, event)
    return not failed, list(summaries.values())


def _stage(summaries: dict[str, StageSummary], key: dg.AssetKey) -> StageSummary:
    name = key.to_user_string()
    return summaries.setdefault(name, StageSummary(name, None, None, []))


def _record(summaries: dict[str, StageSummary], event: dg.DagsterEvent) -> bool:
    """Fold one event into the summaries; True when it is a failed blocking (ERROR) check."""
    data = event.event_specific_data
    if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
        _materialised(_stage(summaries, data.materialization.asset_key), data.materialization.metadata)
    elif event.event_type == dg.DagsterEventType.ASSET_OBSERVATION:
        observation = data.asset_observation
        reason = observation.metadata.get("reason")
        if reason is not None and "status" in observation.metadata:
            stage = _stage(summaries, observation.asset_key)
            stage.note = f"{observation.metadata['status'].value}: {reason.value}"
    elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
        return _checked(_stage(summaries, data.asset_key), data)
    return False


def _value(meta: dict, key: str) -> int | None:
    return meta[key].value if key in meta else None


def _materialised(stage: StageSummary, meta: dict) -> None:
    stage.rows_in, stage.rows_out = _value(meta, "rows_in"), _value(meta, "rows_out")
    grid, observed = _value(meta, "grid_cells"), _value(meta, "observed_cells")
    if grid is not None and observed is not None:
        stage.note = f"{grid:,} cells of the full grid, {observed:,} with people before protection"
    counted, current = _value(meta, "months_counted"), _value(meta, "months_current")
    if counted is not None and current is not None:
        unchanged = "" if counted else " (their inputs unchanged)"
        stage.note = f"{counted} of {counted + current} reporting months counted{unchanged}"
    set_aside = _value(meta, "set_aside")
    if set_aside:  # safehaven.publish.integrity: the lines are warnings in the run's log
        entries = "1 entry" if set_aside == 1 else f"{set_aside} entries"
        stage.note = (
            f"{entries} of published/ altered or planted: kept in evidence/, recorded in the breach register "
            "(the run's log says which)"
        )


def _checked(stage: StageSummary, evaluation: dg.AssetCheckEvaluation) -> bool:
    if evaluation.passed:
        stage.checks_passed += 1
        return False
    if evaluation.severity == dg.AssetCheckSeverity.WARN:
        stage.checks_warned.append(evaluation.check_name)
        return False
    stage.checks_failed.append(evaluation.check_name)
    return True


@contextmanager
def _workspace(instance: dg.DagsterInstance, workspace: Path) -> Iterator[object]:
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    target = WorkspaceFileTarget([str(workspace)])
    with WorkspaceProcessContext(instance, target, code_server_log_level="ERROR") as process_context:
        yield process_context


def month_tags(months: tuple[str, str] | None) -> dict[str, str]:
    """The tags that make a run of the nightly job a run for one reporting month or a range of them
    (``assets.partitions``: Dagster's own partition tags, as a backfill of one run sets them)."""
    if months is None:
        return {}
    first, last = months
    if first == last:
        return {PARTITION_TAG: first}
    return {PARTITION_RANGE_START_TAG: first, PARTITION_RANGE_END_TAG: last}


def _repository(request_context):
    location = request_context.get_code_location(LOCATION)
    return location, next(iter(location.get_repositories().values()))


def _create_run(
    instance: dg.DagsterInstance, request_context, home: Home, job: str, months: tuple[str, str] | None = None
) -> dg.DagsterRun:
    """A run of the job ``job`` of the code location, with its remote origin (as the UI makes one)."""
    from dagster._cli.job import _create_run as create_run

    location, repository = _repository(request_context)
    remote_job = repository.get_full_job(job)
    return create_run(
        instance=instance,
        code_location=location,
        remote_repo=repository,
        remote_job=remote_job,
        run_config=haven_run_config(home, quiet=True),
        tags={"safehaven/started_by": "safehaven run", **month_tags(months)},
        op_selection=None,
        run_id=None,
    )


def _dequeue(process_context, instance: dg.DagsterInstance) -> None:
    """Serve the run queue once, as the daemon would (limits apply), when the instance queues runs."""
    from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    if not isinstance(instance.run_coordinator, QueuedRunCoordinator):
        return
    with QueuedRunCoordinatorDaemon(interval_seconds=1) as daemon:
        list(daemon.run_iteration(process_context))


def launch_nightly(
    instance: dg.DagsterInstance,
    home: Home,
    progress: Callable[[str], None],
    workspace: Path = WORKSPACE,
    timeout: float = 6 * 3600,
    verbose: bool = False,
    months: tuple[str, str] | None = None,
) -> tuple[bool, list[StageSummary], str]:
    """Recover from earlier crashes, then submit each job of one night (module docstring) to the
    instance in turn, follow it to the end, and summarise them all. ``months``: the first and last
    reporting month to count again (the nightly run is then one of those partitions, :func:`month_tags`).
    Returns success, the summaries and the nightly run's id."""
    _recover(instance, home, lambda line: progress(f"recovered: {line}"))
    deadline = time.monotonic() + timeout
    ok, stages, run_id = True, [], ""
    with _workspace(instance, workspace) as process_context:
        request_context = process_context.create_request_context()
        names = [job.name for job in _repository(request_context)[1].get_all_jobs()]
        for name in night_jobs(home, names):
            run = _create_run(instance, request_context, home, name, months if name == NIGHTLY else None)
            instance.submit_run(run.run_id, request_context)
            steps = len(run.step_keys_to_execute or [])
            progress(f"run {run.run_id} ({name}) submitted to the instance ({steps} step{'s' * (steps != 1)})")
            _follow(process_context, instance, run, progress, deadline, verbose)
            run_ok, run_stages = summarise_run(instance, run.run_id)
            final = instance.get_run_by_id(run.run_id)
            ok = ok and run_ok and final is not None and final.status == dg.DagsterRunStatus.SUCCESS
            stages, run_id = stages + run_stages, run.run_id
    return ok, stages, run_id


_WORD = {"STEP_SUCCESS": "done", "STEP_FAILURE": "FAILED", "STEP_SKIPPED": "skipped"}


def _follow(
    process_context, instance, run: dg.DagsterRun, progress: Callable[[str], None], deadline: float, verbose: bool
) -> None:
    """Report each finished step until the run ends (dequeuing it here while no daemon does).

    The status is read before the events, so the events of a run seen finished are all read
    before returning; each poll reads the events after the last one read (the event log's cursor).
    """
    total, cursor, done = len(run.step_keys_to_execute or []), None, 0
    while time.monotonic() < deadline:
        current = instance.get_run_by_id(run.run_id)
        if current.status == dg.DagsterRunStatus.QUEUED:
            _dequeue(process_context, instance)
        new = instance.get_records_for_run(run.run_id, cursor=cursor)
        for record in new.records:
            entry = record.event_log_entry
            event = entry.dagster_event
            if verbose:
                progress(f"  {entry.step_key or '-'}: {entry.message}")
            if event is not None and event.event_type in _STEP_END:
                done += 1
                progress(f"[{done:>2}/{total}] {event.step_key}: {_WORD[event.event_type.value]}")
        cursor = new.cursor
        if current.is_finished:
            return
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"run {run.run_id} did not finish in time; see it in the Dagster UI (make ui)")
