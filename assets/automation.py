"""The nightly job, its schedule (02:00 Europe/London) and a sensor on ``incoming/``."""

import hashlib

import dagster as dg

from resources.haven import SafeHavenResource
from safehaven.core.home import Home

NIGHTLY = "nightly"

nightly_job = dg.define_asset_job(
    NIGHTLY,
    selection=dg.AssetSelection.all(),
    description="Ingest -> validate -> objections -> pseudonymise (+ identity vault) -> aggregate -> publish, "
    "and release per approved agreement.",
    executor_def=dg.in_process_executor,
    tags={"safehaven/store": "writer"},
)

nightly_schedule = dg.ScheduleDefinition(
    name="nightly_0200_london",
    job=nightly_job,
    cron_schedule="0 2 * * *",
    execution_timezone="Europe/London",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


def incoming_fingerprint(home: Home) -> str:
    """A digest of the names, sizes and times of the files waiting in ``incoming/``."""
    digest = hashlib.sha256()
    if home.incoming.exists():
        for path in sorted(p for p in home.incoming.rglob("*") if p.is_file()):
            st = path.stat()
            digest.update(f"{path.relative_to(home.incoming)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dg.sensor(job=nightly_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def incoming_sensor(context: dg.SensorEvaluationContext, haven: SafeHavenResource):
    """Start the nightly job when new files wait in ``incoming/`` (once per distinct set) of the
    resource's home (``SafeHavenResource.home_dir``)."""
    home = haven.home_dir()
    if not home.incoming.exists() or not any(p.is_file() for p in home.incoming.rglob("*")):
        return dg.SkipReason("no files waiting in incoming/")
    fingerprint = incoming_fingerprint(home)
    if fingerprint == context.cursor:
        return dg.SkipReason("these files were already picked up")
    context.update_cursor(fingerprint)
    return dg.RunRequest(run_key=fingerprint)
