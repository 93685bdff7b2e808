"""``dg.materialize`` for the haven's stage assets, in the order a night runs them.

A Dagster run has one partitions definition, and each collection's intake is partitioned by its
own drops (``assets.partitions``): so each collection's intake is materialised in a run of its
own (without a partition: every drop waiting), then the other stages in one run, as
``assets.runner`` does with the jobs. The result answers what the tests ask of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from assets.partitions import DROPS_PREFIX


@dataclass
class StagesResult:
    """The runs of one :func:`materialize_stages`, read as one result."""

    results: list[dg.ExecuteInProcessResult]

    @property
    def success(self) -> bool:
        return all(r.success for r in self.results)

    @property
    def all_events(self) -> list[dg.DagsterEvent]:
        return [e for r in self.results for e in r.all_events]

    def get_asset_materialization_events(self) -> list[dg.DagsterEvent]:
        return [e for r in self.results for e in r.get_asset_materialization_events()]

    def get_asset_check_evaluations(self) -> list[dg.AssetCheckEvaluation]:
        return [e for r in self.results for e in r.get_asset_check_evaluations()]


def _is_intake(asset: dg.AssetsDefinition) -> bool:
    return asset.partitions_def is not None and getattr(asset.partitions_def, "name", "").startswith(DROPS_PREFIX)


def materialize_stages(
    assets: Sequence[dg.AssetsDefinition], *, selection: Sequence[dg.AssetKey] | None = None, **kwargs
) -> StagesResult:
    """Materialise ``assets`` (or the ``selection`` of them): intake per collection first, then the rest."""
    wanted = set(selection) if selection is not None else {k for a in assets for k in a.keys}
    results = []
    for asset in (a for a in assets if _is_intake(a)):
        keys = [k for k in asset.keys if k in wanted]
        if keys:
            results.append(dg.materialize(assets, selection=keys, **kwargs))
    rest = [k for a in assets if not _is_intake(a) for k in a.keys if k in wanted]
    if rest:
        results.append(dg.materialize(assets, selection=rest, **kwargs))
    return StagesResult(results)
