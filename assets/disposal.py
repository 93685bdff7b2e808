"""Disposal: the ``disposal`` job and its daily schedule (``safehaven.dispose.disposal``; CoP 43d, 43f, 48-50).

* ``disposal`` job, one op. Run config says what to dispose of: ``agreement`` (optionally
  ``releases``), or ``collection`` with ``before`` (records received before that day), or
  ``sweep: true`` (resume an interrupted disposal, then dispose of everything due). A pending
  interrupted disposal is always completed first, so a crash half-way is finished by the next
  run whatever it was started for.
* ``disposal_daily_0300_london`` runs the sweep every day at 03:00, after the nightly job; a
  suspension that is not for a breach, or a pseudonym key without an agreement file, is
  logged for a person to review and never disposed of automatically.
* The job writes the store, so it carries the ``safehaven/store: writer`` tag (one writer run at
  a time, queued behind the nightly job) and runs its op in the store pool, in process.

Metadata and logs carry counts, ids and key ids, never values; no rows pass through Dagster.
"""

from datetime import date

import dagster as dg

from assets.keys import STORE_POOL
from resources.haven import SafeHavenResource
from safehaven.dispose import disposal

DISPOSAL = "disposal"


class DisposalConfig(dg.Config):
    """What to dispose of. Exactly one of ``agreement``, ``collection`` (+ ``before``) or ``sweep``."""

    agreement: str = ""
    releases: list[str] = []
    collection: str = ""
    before: str = ""
    sweep: bool = False
    reason: str = ""
    authorised_by: str = ""

    def target(self) -> disposal.Target | None:
        """The target named, or ``None`` for a sweep; ``dg.Failure`` when the config is inconsistent."""
        chosen = sum([bool(self.agreement), bool(self.collection), self.sweep])
        if chosen != 1:
            raise dg.Failure(description="give exactly one of agreement, collection (with before) or sweep: true")
        if self.sweep:
            return None
        try:
            if self.agreement:
                return disposal.Target.for_agreement(self.agreement, self.releases)
            if not self.before:
                raise dg.Failure(description="collection needs before: YYYY-MM-DD (records received before it)")
            return disposal.Target.for_collection(self.collection, date.fromisoformat(self.before))
        except (disposal.DisposalError, ValueError) as exc:
            raise dg.Failure(description=str(exc)) from None


@dg.op(
    name="dispose",
    pool=STORE_POOL,
    out=dg.Out(dg.Nothing),
    description="Dispose of what the config names (or everything due), then certify it.",
)
def dispose_op(context: dg.OpExecutionContext, config: DisposalConfig, haven: SafeHavenResource) -> None:
    ctx = haven.context()
    home = ctx.home
    target = config.target()
    results: list[disposal.DisposalResult] = []
    try:
        if target is None:
            report = disposal.sweep(ctx, authorised_by=config.authorised_by or None)
            results = report.results
            for item in report.review:
                context.log.warning(f"for review, not disposed of: {item.reason}")
            for failure in report.failed:
                context.log.error(f"{failure['target']}: {failure['error']}")
            if report.failed:
                raise dg.Failure(
                    description=f"{len(report.failed)} disposal(s) due could not be done",
                    metadata={"failed": len(report.failed), "disposed": len(results)},
                )
        else:
            resumed = disposal.pending(home)
            if resumed is not None and disposal.Target.from_dict(resumed["target"]) != target:
                done = disposal.resume(ctx)
                if done is not None:
                    results.append(done)
            results.append(
                disposal.dispose(
                    ctx,
                    target,
                    reason=config.reason or None,
                    authorised_by=config.authorised_by or None,
                )
            )
    except disposal.DisposalError as exc:
        raise dg.Failure(description=str(exc)) from None
    for r in results:
        context.log.info(
            f"{r.status}: {r.target.describe()}" + (f" (certificate {r.disposal_id})" if r.disposal_id else "")
        )
    done = [r.as_metadata() for r in results if r.status == "disposed"]
    meta: dict[str, object] = {
        "disposals": len(done),
        "certificates": ", ".join(m.get("disposal_id") or "" for m in done),
        "rows_disposed": sum(int(m.get("rows_disposed", 0)) for m in done),
        "files_destroyed": sum(int(m.get("files_destroyed", 0)) for m in done),
        "key_ids_destroyed": ", ".join(m["key_ids_destroyed"] for m in done if m.get("key_ids_destroyed")),
        "register": dg.MetadataValue.path(str(home.registers / f"{disposal.EXPORT_STEM}.csv")),
    }
    context.add_output_metadata(meta)


@dg.job(
    name=DISPOSAL,
    executor_def=dg.in_process_executor,
    tags={"safehaven/store": "writer"},
    description="Retention and secure disposal: keys destroyed, every copy removed, the store rebuilt, "
    "a certificate recorded (CoP 43d, 43f, 48-50).",
)
def disposal_job() -> None:
    dispose_op()


disposal_schedule = dg.ScheduleDefinition(
    name="disposal_daily_0300_london",
    job=disposal_job,
    cron_schedule="0 3 * * *",
    execution_timezone="Europe/London",
    run_config={"ops": {"dispose": {"config": {"sweep": True}}}},
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every day: complete an interrupted disposal, then dispose of everything past its retention "
    "or its agreement.",
)
