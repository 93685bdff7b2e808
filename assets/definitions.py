"""The Dagster entry point (loaded by workspace.yaml as the code location ``safehaven``).

The stage assets are built here from the contracts, so adding a collection's contract adds
its assets with no code change; the catalog (``assets.catalog``) then gives every asset its
owners, code version, group and column schema from the same contracts.
"""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import dagster as dg

from assets import (
    automation,
    counts,
    disposal,
    intake,
    keys,
    objections,
    outputs,
    pseudonymise,
    publish,
    releases,
)
from assets.catalog import Catalog, annotate_all
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.outputs import load_outputs
from safehaven.share.agreements import scan_agreements


def build_catalog(registry: ContractRegistry) -> Catalog:
    """Owners, versions and schemas for the assets of one set of contracts."""
    found, _errors = scan_agreements(registry.root)
    return Catalog(registry, load_outputs(registry).values(), {i: a.version for i, a in found.items()})


#: the definitions last built from the environment, and what they were built from (``_inputs``)
_BUILT: tuple[tuple[str, str, str], dg.Definitions] | None = None


def _declarations_sha(root: Path) -> str:
    """SHA-256 over every file under the contracts root (names and bytes): any change rebuilds."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _inputs(haven: SafeHavenResource, registry: ContractRegistry) -> tuple[str, str, str]:
    return repr(haven), str(registry.root.resolve()), _declarations_sha(registry.root)


def build_definitions() -> dg.Definitions:
    """All assets, checks, the nightly job, schedule and sensor for the environment's contracts
    (the resource's ``registry()``: ``$SAFEHAVEN_CONTRACTS``, read at this edge).

    Built once a process (issue 22: importing this module builds them for the code location,
    and the in-process runner and tools asked again): the definitions built last are reused
    while the environment's resource, the contracts root and every file under it are the same;
    any change builds them again. ``build_definitions_for`` builds them for given contracts.
    """
    global _BUILT
    haven = SafeHavenResource.from_environment()
    registry = haven.registry()  # $SAFEHAVEN_CONTRACTS, read at this edge
    inputs = _inputs(haven, registry)
    if _BUILT is None or _BUILT[0] != inputs:
        _BUILT = inputs, _build(haven, registry)
    return _BUILT[1]


def build_definitions_for(registry: ContractRegistry) -> dg.Definitions:
    """The same definitions for the contracts of ``registry``, always built afresh (never cached);
    the resource is still the environment's (issue 13: the contracts are named, never defaulted)."""
    return _build(SafeHavenResource.from_environment(), registry)


def _build(haven: SafeHavenResource, registry: ContractRegistry) -> dg.Definitions:
    stage_assets = [
        *intake.build(registry),
        *objections.build(registry),
        *pseudonymise.build(registry),
        *counts.build(registry),
        *outputs.build(registry),
        *publish.build(registry),
        *releases.build(registry),
    ]
    keys.check_labels([key for a in stage_assets for key in a.keys])
    intake_jobs = automation.intake_jobs(registry)
    return dg.Definitions(
        assets=annotate_all(stage_assets, build_catalog(registry)),
        jobs=[automation.nightly_job, *intake_jobs, disposal.disposal_job],
        schedules=[*automation.intake_schedules(intake_jobs), automation.nightly_schedule, disposal.disposal_schedule],
        sensors=[automation.incoming_sensor(registry, intake_jobs)],
        resources={"haven": haven},
        executor=dg.in_process_executor,
    )


def freeze_loaded_objects() -> None:
    """Leave what is loaded so far out of the garbage collector's future passes (``gc.freeze``).

    Loading the code location (Dagster and the definitions) leaves some 140,000 objects that
    live as long as the process; every full collection walks them again, and so does the
    interpreter's last collection at exit. In a first night's process (``safehaven run
    --in-process``, 300 patients) that was 1.1-1.2 s of garbage collection and 1.3 s of exit;
    frozen here, 0.8-0.95 s and 0.5 s (each run worker and the code server load this module
    too). Frozen, they are skipped
    (Python docs, ``gc.freeze``: "move them to a permanent generation and ignore them in all the
    future collections"). It changes when memory is reclaimed, never what the code does: the
    frozen objects are the loaded modules' and live until the process ends (one that later
    becomes garbage in a reference cycle is not reclaimed: memory only, bounded by what was
    loaded). Objects made afterwards (each night's work) are collected as before.
    """
    gc.freeze()


defs = build_definitions()
freeze_loaded_objects()
