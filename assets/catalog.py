"""What the Dagster UI shows of every asset, derived from the contracts in one place.

The contracts already say who owns a collection, which version is in force, which fields it
has and how identifiable each one is (confidentiality guide Rule 3: identifiable,
de-identified for limited access, anonymised). This module turns that into Dagster's own
vocabulary, applied to the stage assets once when the definitions are built:

* ``owners``: the contract's owner (an e-mail address, or ``team:<slug>`` of its text); the
  statistics team for published outputs; information governance for releases and the
  objection register;
* ``code_version``: the version of the contract, output definition or agreement the asset is
  built from (so the UI marks an asset stale when its contract changes);
* ``group_name``: the first part of the asset key (``landing``, ``validated``, ``haven``,
  ``counts``, ``vault``, ``governance``, ``published``, ``release``), so groups and keys agree (keys
  come from ``assets.keys`` only, and their last part, the UI's label, is distinct); the stage
  the asset was built by (ingest, validate, objections, pseudonymise, aggregate, publish,
  release) stays visible as the tag ``safehaven/stage``;
* ``dagster/column_schema``: the columns of the table the asset writes, each tagged with its
  identifiability class; rows are never shown, only their shape.

Row counts (``dagster/row_count``) are reported by each asset at materialisation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import dagster as dg

from assets import keys
from safehaven.intake.contracts import Contract, ContractRegistry, FieldSpec
from safehaven.protect.pseudonymise import haven_column
from safehaven.publish.outputs import Output

OWNER_STATISTICS = "team:statistics"
OWNER_GOVERNANCE = "team:information-governance"
OWNER_PIPELINE = "team:data-engineering"
IDENTIFIABILITY_TAG = "identifiability"
#: the pipeline stage an asset belongs to (ingest ... publish, release), kept as a tag because
#: the group is the key's first part
STAGE_TAG = "safehaven/stage"
#: the haven's own columns added to every collection's haven table
HAVEN_PID = dg.TableColumn(
    "pid", "VARCHAR", description="Keyed pseudonym (HMAC-SHA256)", tags={IDENTIFIABILITY_TAG: "pseudonym"}
)
_META = {IDENTIFIABILITY_TAG: "content"}
#: the identity vault's table (``safehaven.protect.vault.IDENTITY``): one entry per person and field
VAULT_COLUMNS = [
    dg.TableColumn("pid", "VARCHAR", description="Keyed pseudonym", tags={IDENTIFIABILITY_TAG: "pseudonym"}),
    dg.TableColumn("field", "VARCHAR", description="Which identifier the entry holds", tags=_META),
    dg.TableColumn("nonce", "BLOB", description="AES-GCM nonce", tags=_META),
    dg.TableColumn("ciphertext", "BLOB", description="AES-256-GCM ciphertext", tags={IDENTIFIABILITY_TAG: "encrypted"}),
    dg.TableColumn("dek_id", "VARCHAR", description="The wrapped data key that encrypts it", tags=_META),
    dg.TableColumn("collection", "VARCHAR", description="The collection it came from", tags=_META),
    dg.TableColumn("added_at", "TIMESTAMPTZ", description="When it was vaulted", tags=_META),
]


def owner_of(text: str) -> str:
    """A Dagster owner for a contract's free-text owner.

    An e-mail address is used as it is; otherwise the team is the text after the last comma
    (``"GP Extraction Service (synthetic), data engineering team"`` -> ``team:data-engineering``).
    """
    email = re.search(r"[\w.+-]+@[\w-]+\.[\w.-]+", text)
    if email:
        return email.group(0)
    team = re.sub(r"\bteam\b", "", text.rsplit(",", 1)[-1].lower())
    slug = re.sub(r"[^a-z0-9]+", "-", team).strip("-")
    return f"team:{slug}" if slug else OWNER_PIPELINE


def _column(spec: FieldSpec, name: str | None = None) -> dg.TableColumn:
    return dg.TableColumn(
        name or spec.name,
        spec.type,
        description=spec.description,
        constraints=dg.TableColumnConstraints(nullable=not spec.required),
        tags={IDENTIFIABILITY_TAG: spec.identifiability},
    )


def landing_schema(contract: Contract) -> dg.TableSchema:
    """The landing and validated tables: the contract's fields as received."""
    return dg.TableSchema(columns=[_column(f) for f in contract.fields])


def haven_schema(contract: Contract) -> dg.TableSchema:
    """The haven table: a pseudonym, no direct identifiers, coarsened quasi-identifiers."""
    kept = [_column(f, haven_column(f)) for f in contract.fields if f.identifiability != "direct_identifier"]
    return dg.TableSchema(columns=[HAVEN_PID, *kept])


def output_schema(output: Output) -> dg.TableSchema:
    """A published table: its dimensions and measures, all anonymised."""
    anonymised = {IDENTIFIABILITY_TAG: "anonymised"}
    dims = [dg.TableColumn(d.name, "VARCHAR", description=d.description, tags=anonymised) for d in output.dimensions]
    measures = [dg.TableColumn(m.name, "BIGINT", description=m.description, tags=anonymised) for m in output.measures]
    return dg.TableSchema(columns=dims + measures)


def counts_schema(output: Output) -> dg.TableSchema:
    """An output's true counts: its dimensions and counted measures, before disclosure control."""
    true_count = {IDENTIFIABILITY_TAG: "true_count"}
    dims = [dg.TableColumn(d.name, "VARCHAR", description=d.description, tags=true_count) for d in output.dimensions]
    counted = [m for m in output.measures if m.kind in ("count", "denominator")]
    measures = [
        dg.TableColumn(m.name, "BIGINT", description="True count, unrounded and unsuppressed", tags=true_count)
        for m in counted
    ]
    return dg.TableSchema(columns=dims + measures)


#: a published output not refreshed for this long means a nightly run was missed (a warning)
MISSED_NIGHTS_WARNING = timedelta(days=2)


@dataclass(frozen=True)
class Entry:
    """What the catalog knows of one asset."""

    owner: str
    version: str | None = None
    schema: dg.TableSchema | None = None
    freshness: dg.FreshnessPolicy | None = None


def output_freshness(output: Output) -> dg.FreshnessPolicy:
    """A published output is stale past its timeliness target (CoP 28-29: timeliness and punctuality)."""
    return dg.FreshnessPolicy.time_window(
        fail_window=timedelta(days=output.timeliness_target_days), warn_window=MISSED_NIGHTS_WARNING
    )


class Catalog:
    """Owners, versions and schemas for every asset key, from one set of contracts."""

    def __init__(self, registry: ContractRegistry, outputs: Iterable[Output], agreement_versions: dict[str, str]):
        self._entries: dict[dg.AssetKey, Entry] = {}
        for c in registry.contracts.values():
            owner = owner_of(c.owner)
            self._entries[keys.landing(c.collection)] = Entry(owner, c.version, landing_schema(c))
            self._entries[keys.validated(c.collection)] = Entry(owner, c.version, landing_schema(c))
            self._entries[keys.haven(c.collection)] = Entry(owner, c.version, haven_schema(c))
            self._entries[keys.vault(c.collection)] = Entry(owner, c.version, dg.TableSchema(VAULT_COLUMNS))
        for o in outputs:
            entry = Entry(OWNER_STATISTICS, o.version, output_schema(o), output_freshness(o))
            self._entries[keys.published(o.name)] = entry
            self._entries[keys.counts(o.name)] = Entry(OWNER_STATISTICS, o.version, counts_schema(o))
        for agreement_id, version in agreement_versions.items():
            self._entries[keys.release(agreement_id)] = Entry(OWNER_GOVERNANCE, version)
        self._objections_version = registry.objections().version

    def entry(self, key: dg.AssetKey) -> Entry:
        """The catalog's entry for ``key`` (governance assets follow the objections contract)."""
        if key in self._entries:
            return self._entries[key]
        if keys.group(key) == keys.GOVERNANCE:
            return Entry(OWNER_GOVERNANCE, self._objections_version)
        return Entry(OWNER_STATISTICS if keys.group(key) == keys.PUBLISHED else OWNER_PIPELINE)

    def annotate(self, spec: dg.AssetSpec) -> dg.AssetSpec:
        """The spec with owners, code version, a group named after its key, schema and freshness."""
        entry = self.entry(spec.key)
        metadata = dict(spec.metadata)
        if entry.schema is not None:
            metadata["dagster/column_schema"] = entry.schema
        return spec.replace_attributes(
            owners=[entry.owner],
            code_version=entry.version,
            group_name=keys.group(spec.key),
            tags={**spec.tags, STAGE_TAG: spec.group_name or "default"},
            metadata=metadata,
            freshness_policy=entry.freshness or spec.freshness_policy,
        )


def annotate_all(assets: list[dg.AssetsDefinition], catalog: Catalog) -> list[dg.AssetsDefinition]:
    """Every asset definition with the catalog's attributes on each of its specs."""
    return [a.map_asset_specs(catalog.annotate) for a in assets]
