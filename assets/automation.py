"""The jobs, the nightly schedule (02:00 Europe/London) and the sensor on ``incoming/``.

* ``intake_<collection>``: a collection's landing and validation, partitioned by drop
  (``assets.partitions``). The sensor starts one run per new drop as it arrives.
  Each intake job also runs at 01:45 Europe/London without a partition (every drop still waiting,
  every batch landed and not validated), so what a failed run left is taken up before the night.
* ``nightly``: everything after intake (objections, pseudonymisation and the vault, counting
  by reporting month, protection, publication and releases), over what intake accepted; it is
  partitioned by reporting month, and the schedule starts it without a partition (every month
  whose inputs changed). A batch refused at validation never reaches it: downstream stages read
  accepted batches only (``safehaven.intake.validation``).
* ``safehaven run`` (``assets.runner``) runs intake for every collection with something waiting,
  then the nightly job, each to the end.
"""

import hashlib

import dagster as dg

from assets import keys, partitions
from resources.haven import COMPACTION_DEFERRED, COMPACTION_TAG, SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import waiting_drops

NIGHTLY = "nightly"
#: a collection's intake job is ``intake_<collection>``
INTAKE_PREFIX = "intake_"
#: the tag the run queue limits to one run at a time (``deploy/dagster.yaml``): every job writes the store
WRITER_TAGS = {"safehaven/store": "writer"}

nightly_job = dg.define_asset_job(
    NIGHTLY,
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups(keys.LANDING, keys.VALIDATED),
    description="Objections -> pseudonymise (+ identity vault) -> count by reporting month -> protect and "
    "publish, and release per approved agreement, over the batches intake accepted.",
    executor_def=dg.in_process_executor,
    tags=WRITER_TAGS,
)

nightly_schedule = dg.ScheduleDefinition(
    name="nightly_0200_london",
    job=nightly_job,
    cron_schedule="0 2 * * *",
    execution_timezone="Europe/London",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


def intake_job_name(collection: str) -> str:
    return f"{INTAKE_PREFIX}{collection}"


def intake_job(collection: str) -> dg.JobDefinition:
    """One collection's intake: landing and validation of its drops (``assets.partitions``)."""
    return dg.define_asset_job(
        intake_job_name(collection),
        selection=dg.AssetSelection.assets(keys.landing(collection), keys.validated(collection)),
        partitions_def=partitions.drops(collection),
        description=f"Land and validate {collection} drops: each drop a partition; a run without one takes "
        "every drop waiting.",
        executor_def=dg.in_process_executor,
        tags=WRITER_TAGS | {COMPACTION_TAG: COMPACTION_DEFERRED},  # the night's run compacts (resources.haven)
    )


def intake_jobs(registry: ContractRegistry) -> list[dg.JobDefinition]:
    return [intake_job(c) for c in registry.contracts]


def intake_schedules(jobs: list[dg.JobDefinition]) -> list[dg.ScheduleDefinition]:
    """Each intake job, without a partition, at 01:45 Europe/London, before the nightly job: it takes
    every drop still waiting and validates every batch landed and not validated, so a drop whose
    sensor-started run failed (its run key is not requested twice), or a run stopped between
    landing and validation, is taken up the same night with no one stepping in."""
    return [
        dg.ScheduleDefinition(
            name=f"{job.name}_0145_london",
            job=job,
            cron_schedule="45 1 * * *",
            execution_timezone="Europe/London",
            default_status=dg.DefaultScheduleStatus.RUNNING,
        )
        for job in jobs
    ]


def drops_fingerprint(found: dict[str, dict[str, object]]) -> str:
    """A digest of the drops waiting, per collection (their keys carry names, sizes and times)."""
    digest = hashlib.sha256()
    for collection in sorted(found):
        for drop in sorted(found[collection]):
            digest.update(f"{collection}/{drop}\n".encode())
    return digest.hexdigest()


def incoming_sensor(registry: ContractRegistry, intake: list[dg.JobDefinition]) -> dg.SensorDefinition:
    """The sensor on the resource's ``incoming/`` for the collections of ``registry``, whose
    intake jobs are ``intake`` (:func:`intake_jobs`, the same objects the definitions hold)."""

    @dg.sensor(
        name="incoming_sensor",
        jobs=[nightly_job, *intake],
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def _incoming_sensor(context: dg.SensorEvaluationContext, haven: SafeHavenResource):
        """For each drop waiting in ``incoming/`` (of the resource's home, ``SafeHavenResource.home_dir``):
        add it to its collection's drops and start its intake run (once per drop); then start the
        nightly job after them (once per distinct set of drops waiting). A file still being written is
        not a drop yet. Opens no store."""
        home = haven.home_dir()
        found = {c: waiting_drops(home.incoming_for(c), contract) for c, contract in registry.contracts.items()}
        if not any(found.values()):
            return dg.SkipReason("no files waiting in incoming/")
        fingerprint = drops_fingerprint(found)
        if fingerprint == context.cursor:
            return dg.SkipReason("these files were already picked up")
        requests = [
            dg.RunRequest(job_name=intake_job_name(c), partition_key=drop, run_key=f"{c}/{drop}")
            for c, drops in found.items()
            for drop in drops
        ]
        added = [
            dg.AddDynamicPartitionsRequest(partitions.drops(c).name, list(drops)) for c, drops in found.items() if drops
        ]
        requests.append(dg.RunRequest(job_name=NIGHTLY, run_key=fingerprint))
        context.update_cursor(fingerprint)
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=added)

    return _incoming_sensor
