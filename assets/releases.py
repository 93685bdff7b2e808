"""Release stage: one asset per data-sharing agreement (safehaven.share.releases, safehaven.share.review).

Each asset re-reads its agreement when it runs, so a suspension or expiry takes effect at once:

* in force: a minimum-necessary release is *prepared* in ``staging/releases/<release-id>/``
  and a release request opened for two reviewers (``safehaven review``); the asset
  materialises with counts (never values). Nothing reaches ``releases/<agreement>/`` until the
  request is approved (an ``automatic`` routine flow is released at once);
* unchanged (the content equals the agreement's latest request), draft, suspended, changed
  since approval, expired or not yet started: nothing is opened; the asset does not
  materialise but records an observation with the reason;
* its check ``release_requests_reviewed`` (severity WARN) fails while a request of the
  agreement waits for reviewers or the custodian, with the checker summary as Markdown
  metadata: a waiting request is a warning, not a failed run (SATRE 3.3.05); and while a
  request of it that will never leave keeps files whose shredding is refused (retried at
  every run, audited once per reason: ``safehaven.share.review.shred_discarded``; CoP 27b);
* refused (a linkage no agreement names, an agreement that does not validate, k-anonymity
  that cannot be met, an identifiable release without the vault): the asset fails with the
  reason; breaches are in the breach register and every outcome in the audit trail.

An agreement file that does not parse still gets an asset, which fails with the parse error.

An anonymised-publication agreement that a published output names (``linkage.agreement`` in
``data_contracts/outputs/``) gets no release asset: the output is its only product, so one
cohort is never published as two differently protected tables (which would widen the
differencing surface; CoP 34b).
"""

from collections.abc import Iterator

import dagster as dg

from assets import keys
from assets.keys import release as release_key
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import feed
from safehaven.publish.outputs import load_outputs
from safehaven.share import checker, review
from safehaven.share.agreements import Agreement, scan_agreements
from safehaven.share.linkage import LinkageRefused
from safehaven.share.releases import PREPARED, RELEASED, ReleaseRefused, prepare

GROUP = "release"
REVIEW_CHECK = "release_requests_reviewed"
#: states in which a request waits for a person (reviewers, or the custodian once approved)
WAITING = (*review.AWAITING_REVIEW, review.APPROVED)


def review_check(con: object, agreement_id: str) -> dg.AssetCheckResult:
    """WARN while requests of the agreement wait (the newest one's checker summary as Markdown),
    or while a request of it that will never leave keeps files whose shredding is refused
    (``safehaven.share.review.unshredded``: in view until a person clears it; CoP 27b), or while
    an approved request's delivery stopped part way (``review.stopped_deliveries``), named first."""
    waiting = review.requests(con, states=WAITING, agreement_id=agreement_id)  # type: ignore[arg-type]
    unshredded = review.unshredded(con, agreement_id)  # type: ignore[arg-type]
    metadata: dict[str, object] = {"waiting": len(waiting), "requests": ", ".join(r.release_id for r in waiting)}
    if waiting:
        newest = waiting[-1]
        metadata["summary"] = dg.MetadataValue.md(checker.to_markdown(newest.summary))
        metadata["next_step"] = f"safehaven review show {newest.release_id}"
    if unshredded:
        metadata["shredding_refused"] = dg.MetadataValue.md("\n".join(f"* {rid}: {why}" for rid, why in unshredded))
    stopped = review.stopped_deliveries(con, agreement_id)  # type: ignore[arg-type]
    said = [
        f"the delivery of {rid} stopped part way: its files are in {where}; finish it with "
        f"safehaven review release {rid} (or, while it is not registered, withdraw it, which shreds them)"
        for rid, where in stopped
    ]
    said += [f"{len(waiting)} release request(s) waiting for review"] if waiting else []
    said += [f"the files of {rid} (will never leave) are not shredded: {why}" for rid, why in unshredded]
    return dg.AssetCheckResult(
        check_name=REVIEW_CHECK,
        asset_key=release_key(agreement_id),
        passed=not (waiting or unshredded or stopped),
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description="; ".join(said) or "nothing waiting",
    )


def _objections_window(haven: SafeHavenResource, agreement_id: str, agreement: Agreement | None) -> int:
    """The haven's objection window; an unreadable one stops a record-level release (one line).

    Anonymised releases are not held by the objection feed (guide Rule 4C), so they go on.
    """
    try:
        return haven.objections_window()
    except feed.ObjectionFeedBlocked as exc:
        if agreement is not None and agreement.identifiability == "anonymised":
            return feed.DEFAULT_WINDOW_DAYS
        raise dg.Failure(
            description=f"release under {agreement_id} refused: {exc}",
            metadata={"agreement": agreement_id, "released": False},
        ) from None


def release_asset(
    agreement_id: str, agreement: Agreement | None, registry: ContractRegistry, error: str | None = None
) -> dg.AssetsDefinition:
    """The release asset of one agreement (or a failing one for an unreadable agreement file)."""
    content = {c.collection for c in registry.content()}
    collections = [c for c in agreement.collections if c in content] if agreement else []
    if agreement:
        description = (
            f"{agreement.title}. {agreement.identifiability.capitalize()} release to "
            f"{agreement.recipient.name} under {agreement.basis} (agreement v{agreement.version})."
        )
    else:
        description = f"Agreement file {agreement_id}.yaml does not parse; nothing can be released."

    # a record-level release waits on the objection feed's blocking check (safehaven.protect.feed)
    feed_dep = [keys.OBJECTION_FEED] if agreement is None or agreement.identifiability != "anonymised" else []

    @dg.asset(
        key=release_key(agreement_id),
        deps=[keys.haven(c) for c in collections] + [keys.OBJECTION_REGISTER] + feed_dep,
        group_name=GROUP,
        pool=keys.STORE_POOL,
        output_required=False,
        description=description,
        kinds={"parquet"},
        check_specs=[
            dg.AssetCheckSpec(
                REVIEW_CHECK,
                asset=release_key(agreement_id),
                description="Warns while a release request waits for its reviewers (safehaven review list).",
            )
        ],
    )
    def _release(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> Iterator[object]:
        if error is not None:
            raise dg.Failure(description=error, metadata={"agreement": agreement_id, "released": False})
        window = _objections_window(haven, agreement_id, agreement)
        with haven.connect() as con:
            review.shred_discarded(con, agreement_id=agreement_id)  # retried every night, not only at a preparation
            try:
                result = prepare(
                    con,
                    agreement_id,
                    haven=haven.context(),
                    objections_max_age_days=window,
                )
            except (ReleaseRefused, LinkageRefused) as exc:
                raise dg.Failure(
                    description=f"release under {agreement_id} refused: {exc}",
                    metadata={
                        "agreement": agreement_id,
                        "released": False,
                        "breach_id": exc.breach_id if exc.breach_id is not None else -1,
                    },
                ) from None
            check = review_check(con, agreement_id)
        if result.status not in (PREPARED, RELEASED):
            context.log.warning(f"{agreement_id}: {result.reason}")
            yield dg.AssetObservation(asset_key=release_key(agreement_id), metadata=result.as_metadata())
            yield check
            return
        context.log.info(f"{agreement_id}: {result.reason} ({result.directory})")
        yield dg.MaterializeResult(
            metadata={
                **result.as_metadata(),
                "rows_in": result.records_released
                + result.records_withheld
                + (result.k.records_removed if result.k else 0),
                "location": dg.MetadataValue.path(str(result.directory)),
                "dagster/row_count": result.records_released,
            }
        )
        yield check

    return _release


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    """A release asset for every agreement file under the contracts root."""
    found, errors = scan_agreements(registry.root)
    published_under = {o.linkage.agreement for o in load_outputs(registry).values() if o.linkage}
    assets = [
        release_asset(i, a, registry)
        for i, a in found.items()
        if not (a.identifiability == "anonymised" and i in published_under)
    ]
    assets += [release_asset(i, None, registry, error) for i, error in errors.items()]
    return assets
