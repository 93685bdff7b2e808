"""The Dagster entry point (loaded by workspace.yaml as the code location ``safehaven``).

The stage assets are built here from the contracts, so adding a collection's contract adds
its assets with no code change; the catalog (``assets.catalog``) then gives every asset its
owners, code version, group and column schema from the same contracts.
"""

from __future__ import annotations

import dagster as dg

from assets import automation, disposal, ingest, objections, outputs, pseudonymise, publish, releases, validate
from assets.catalog import Catalog, annotate_all
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.outputs import load_outputs
from safehaven.share.agreements import scan_agreements


def build_catalog(registry: ContractRegistry) -> Catalog:
    """Owners, versions and schemas for the assets of one set of contracts."""
    found, _errors = scan_agreements(registry.root)
    return Catalog(registry, load_outputs(registry).values(), {i: a.version for i, a in found.items()})


def build_definitions(registry: ContractRegistry | None = None) -> dg.Definitions:
    """All assets, checks, the nightly job, schedule and sensor for one set of contracts."""
    haven = SafeHavenResource.from_environment()
    registry = registry or haven.registry()  # $SAFEHAVEN_CONTRACTS, read at this edge
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
        assets=annotate_all(stage_assets, build_catalog(registry)),
        jobs=[automation.nightly_job, disposal.disposal_job],
        schedules=[automation.nightly_schedule, disposal.disposal_schedule],
        sensors=[automation.incoming_sensor],
        resources={"haven": haven},
        executor=dg.in_process_executor,
    )


defs = build_definitions()
