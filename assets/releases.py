"""Release stage: one asset per data-sharing agreement (safehaven.share.releases, safehaven.share.agreements).

Each asset re-reads its agreement when it runs, so a suspension or expiry takes effect at once:

* in force: a minimum-necessary release is written to ``releases/<agreement>/<release-id>/``
  and the asset materialises with counts (never values);
* draft, suspended, expired or not yet started: nothing is written; the asset does not
  materialise but records an observation with the reason;
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
from safehaven.publish.outputs import load_outputs
from safehaven.share.agreements import Agreement, scan_agreements
from safehaven.share.linkage import LinkageRefused
from safehaven.share.releases import ReleaseRefused, release

GROUP = "release"


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
    )
    def _release(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> Iterator[object]:
        if error is not None:
            raise dg.Failure(description=error, metadata={"agreement": agreement_id, "released": False})
        home = haven.home_dir()
        with haven.connect() as con:
            try:
                result = release(con, agreement_id, home=home, registry=haven.registry(), keyring=haven.keyring())
            except (ReleaseRefused, LinkageRefused) as exc:
                raise dg.Failure(
                    description=f"release under {agreement_id} refused: {exc}",
                    metadata={
                        "agreement": agreement_id,
                        "released": False,
                        "breach_id": exc.breach_id if exc.breach_id is not None else -1,
                    },
                ) from None
        if result.status != "released":
            context.log.warning(f"{agreement_id}: {result.reason}")
            yield dg.AssetObservation(asset_key=release_key(agreement_id), metadata=result.as_metadata())
            return
        context.log.info(f"{agreement_id}: release {result.release_id} written to {result.directory}")
        yield dg.MaterializeResult(
            metadata={
                **result.as_metadata(),
                "rows_in": result.records_released
                + result.records_withheld
                + (result.k.records_removed if result.k else 0),
                "location": dg.MetadataValue.path(str(result.directory)),
            }
        )

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
