"""The single Dagster entry point (loaded by workspace.yaml).

It is the one module of the ``safehaven`` package that imports Dagster: the domain core
stays framework-free, and the stage assets in ``assets/`` are built here from the contracts,
so adding a collection's contract adds its assets with no code change.
"""

from __future__ import annotations

import dagster as dg

from assets import automation, disposal, ingest, objections, outputs, pseudonymise, publish, releases, validate
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry


def build_definitions(registry: ContractRegistry | None = None) -> dg.Definitions:
    """All assets, checks, the nightly job, schedule and sensor for one set of contracts."""
    registry = registry or ContractRegistry()
    stage_assets = [
        *ingest.build(registry),
        *validate.build(registry),
        *objections.build(registry),
        *pseudonymise.build(registry),
        *outputs.build(registry),
        *publish.build(registry),
        *releases.build(registry),
    ]
    return dg.Definitions(
        assets=stage_assets,
        jobs=[automation.nightly_job, disposal.disposal_job],
        schedules=[automation.nightly_schedule, disposal.disposal_schedule],
        sensors=[automation.incoming_sensor],
        resources={"haven": SafeHavenResource()},
        executor=dg.in_process_executor,
    )


defs = build_definitions()
