"""Run the nightly job in process and summarise it (used by ``safehaven run`` / ``make run``).

This module, like ``assets.definitions``, is Dagster-facing: the CLI imports it lazily so
the other governance commands work without loading the pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import dagster as dg

from assets.definitions import build_definitions
from safehaven.core.home import Home


@dataclass
class StageSummary:
    asset: str
    rows_in: int | None
    rows_out: int | None
    checks_failed: list[str]
    #: failed checks of WARN severity (e.g. an outlier objection rate): reported, not fatal
    checks_warned: list[str] = field(default_factory=list)


def run_nightly(
    home: Home | None = None, instance: dg.DagsterInstance | None = None
) -> tuple[bool, list[StageSummary]]:
    """Materialise every asset of the nightly job once; return success and per-asset counts."""
    if home is not None:
        os.environ["SAFEHAVEN_HOME"] = str(home.root)
    defs = build_definitions()
    job = defs.resolve_job_def("nightly")
    if instance is None:
        instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
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
