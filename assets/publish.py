"""Publish stage: the protected outputs leave the store as open files (``safehaven.publish.publication``).

The core verifies the whole release again (disclosure invariants, publication guard, quality
statements) and writes nothing if any output fails, nor when nothing changed since the last
publication (``safehaven.publish.reuse``); the asset only reports what was written, and, as
warnings, what the check of ``published/`` found altered or planted and set aside
(``safehaven.publish.integrity``; a refusal carries those lines in its message). A collection
held at intake refuses it as it refuses the steps before it (``assets.guards.held_fails``).
"""

import dagster as dg

from assets import keys
from assets.guards import held_fails
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.outputs import load_outputs
from safehaven.publish.publication import OGL, publish_release
from safehaven.publish.quality import load_statement


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    outputs = list(load_outputs(registry).values())

    @dg.asset(
        key=keys.PUBLISHED_FILES,
        deps=[keys.published(o.name) for o in outputs],
        group_name="publish",
        pool=keys.STORE_POOL,
        description="Anonymised outputs as CSV, Parquet and published.duckdb, each with its data dictionary "
        "and quality statement, the methods and the Open Government Licence.",
        kinds={"csv", "parquet"},
    )
    def published_files(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> dg.MaterializeResult:
        home = haven.home_dir()
        with haven.connect() as con, held_fails():  # a held collection refuses it (its reason, no traceback)
            release = publish_release(con, outputs, haven.registry(), home)
            statement = load_statement(con, outputs[0].name) if outputs else None
        # the disclosure audit of the whole release (safehaven.publish.release_audit): counts and time only
        audit = ((statement or {}).get("accuracy") or {}).get("disclosure_audit") or {}
        for line in release.set_aside:  # altered or planted in published/ (safehaven.publish.integrity)
            context.log.warning(line)
        if release.unchanged:
            context.log.info(f"nothing changed since release {release.release_id}: not re-issued ({home.published})")
        else:
            n = len(release.outputs)
            context.log.info(f"published release {release.release_id}: {n} outputs to {home.published}")
        return dg.MaterializeResult(
            metadata={
                "rows_in": release.rows,
                "rows_out": release.rows,
                "dagster/row_count": release.rows,
                "outputs": len(release.outputs),
                "files": len(release.files),
                "files_removed": len(release.removed),
                "set_aside": len(release.set_aside),
                "release_id": release.release_id,
                "unchanged": release.unchanged,
                "location": dg.MetadataValue.path(str(home.published)),
                "licence": OGL,
                **audit,
            }
        )

    return [published_files]
