"""Run the nightly job in process and summarise it (used by ``safehaven run`` / ``make run``).

This module, like ``assets.definitions``, is Dagster-facing: the CLI imports it lazily so
the other governance commands work without loading the pipeline.

Self-healing (the project's "no human after a crash" rule): before the job starts,
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
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg

from assets.definitions import build_definitions
from safehaven.core import runs
from safehaven.core.home import Home

FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
DEAD_RUN_MESSAGE = (
    "the run's process ended without finishing (killed or crashed); marked failed by the next safehaven run"
)

log = logging.getLogger(__name__)


@dataclass
class StageSummary:
    asset: str
    rows_in: int | None
    rows_out: int | None
    checks_failed: list[str]
    #: failed checks of WARN severity (e.g. an outlier objection rate): reported, not fatal
    checks_warned: list[str] = field(default_factory=list)


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


def run_nightly(
    home: Home | None = None,
    instance: dg.DagsterInstance | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[bool, list[StageSummary]]:
    """Recover from earlier crashes, then materialise every asset of the nightly job once.

    Returns success and per-asset counts; what recovery did is passed to ``report`` (default:
    this module's logger).
    """
    if home is not None:
        os.environ["SAFEHAVEN_HOME"] = str(home.root)
    defs = build_definitions()
    job = defs.resolve_job_def("nightly")
    if instance is None:
        instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    for line in recover(instance, (home or Home.from_env()).ensure()):
        (report or log.warning)(line)
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    summaries: list[StageSummary] = []
    failed_checks: dict[str, list[str]] = {}
    warned_checks: dict[str, list[str]] = {}
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            into = warned_checks if evaluation.severity == dg.AssetCheckSeverity.WARN else failed_checks
            into.setdefault(evaluation.asset_key.to_user_string(), []).append(evaluation.check_name)
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization  # type: ignore[union-attr]
        meta = mat.metadata
        key = mat.asset_key.to_user_string()
        summaries.append(
            StageSummary(
                key,
                meta["rows_in"].value if "rows_in" in meta else None,  # type: ignore[union-attr]
                meta["rows_out"].value if "rows_out" in meta else None,  # type: ignore[union-attr]
                failed_checks.get(key, []),
                warned_checks.get(key, []),
            )
        )
    for failure in result.get_step_failure_events():
        summaries.append(StageSummary(f"{failure.step_key} (step)", None, None, ["step failed"]))
    return result.success and not failed_checks, summaries
