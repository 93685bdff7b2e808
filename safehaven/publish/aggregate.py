"""The aggregate stage's unit of work: one output built, protected and checked, or reused.

:func:`count` is the counting step alone (the ``counts/<output>_counts`` assets, by reporting
month: ``safehaven.publish.counting``); :func:`aggregate` builds from those counts, counting any
month that is stale first. Order, each step refusing before the next (CoP 34b, 35; ISB 1523):

1. the store's code lists refreshed (no write when current);
2. a linked output's linkage authorised by the store's agreement decisions, every run
   (``safehaven.share.linkage``): a suspended agreement stops it even when nothing else changed;
3. the reporting period and the output's fingerprint (``safehaven.publish.reuse``): when every
   input is unchanged since the last passing build and the protected table is intact, the
   build is reused; otherwise the output is counted, protected and audited
   (``safehaven.publish.outputs.build_output``) and its quality statement rebuilt;
4. either way, the disclosure invariants and the publication guard are checked on the table as
   it stands, and only a build that passes both is remembered for reuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any

import duckdb

from safehaven.core.home import Home
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.validation import refuse_held
from safehaven.publish import counting, reuse
from safehaven.publish.outputs import (
    CODES,
    Output,
    build_output,
    install_helpers,
    load_code_lists,
    load_outputs,
    reporting_period,
    require_agreement,
    table_violations,
)
from safehaven.publish.publication import guard_table
from safehaven.publish.quality import build_statement, load_statement, store_statement
from safehaven.share import approvals
from safehaven.share.linkage import authorise_linkage


@dataclass
class AggregateResult:
    """What the stage did for one output: its metadata, its check findings and its statement."""

    output: str
    rebuilt: bool
    metadata: dict[str, Any]
    violations: list[str] = field(default_factory=list)
    guard: list[str] = field(default_factory=list)
    statement: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return not self.violations and not self.guard


def _authorised_agreement(con: duckdb.DuckDBPyConnection, output: Output, registry: ContractRegistry) -> str | None:
    """The id of the agreement authorising a linked output's linkage (refuses otherwise); None if unlinked.

    An output reading several collections with no linkage declared is refused, not treated as
    unlinked (``outputs.require_agreement``): its counting would join them under no agreement.
    """
    if not output.linkage:
        require_agreement(output, None)
        return None
    agreement = authorise_linkage(
        con,
        approvals.effective_agreements(con, registry.root),  # the store's decisions, not the files
        output.linkage.left,
        output.linkage.right,
        output.linkage.purpose,
        registry=registry,
        identifiability="anonymised",  # a published statistic: never under a record-level agreement
    )
    return agreement.id


def count(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    registry: ContractRegistry,
    months: list[date] | None = None,
    *,
    today: date | None = None,
) -> tuple[counting.CountReport, list[date]]:
    """Count ``output``'s stale months and ``months`` (``safehaven.publish.counting``), linkage first.

    A linked output's counting *is* its linkage, so the agreement is authorised before any count,
    as for a build. Asked months outside this output's period are not counted and are returned
    second (another output's period may hold them: the month partitions are shared). Refused
    (``CollectionHeld``) while a collection it reads is held (``safehaven.intake.validation.refuse_held``).
    """
    refuse_held(con, registry, output.collections, f"counting {output.name}")
    load_code_lists(con, registry)
    agreement_id = _authorised_agreement(con, output, registry)
    period = reporting_period(con, output, registry, today)
    install_helpers(con, period)
    inside = set(counting.period_months(period))
    outside = sorted(m for m in months or [] if m not in inside)
    fingerprint = counting.counting_fingerprint(con, output, period, agreement_id, codes=CODES)
    report = counting.count_months(con, output, period, fingerprint, [m for m in months or [] if m in inside])
    return report, outside


def aggregate(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    registry: ContractRegistry,
    home: Home,
    *,
    today: date | None = None,
) -> AggregateResult:
    """Build ``published.<output>`` (or reuse it when nothing it reads changed), then check it.
    Refused (``CollectionHeld``) while a collection it reads is held, as :func:`count` is."""
    refuse_held(con, registry, output.collections, f"output {output.name}")
    load_code_lists(con, registry)
    agreement_id = _authorised_agreement(con, output, registry)
    publication = load_outputs(registry)
    period = reporting_period(con, output, registry, today)
    counted = counting.counting_fingerprint(con, output, period, agreement_id, codes=CODES)
    fingerprint = reuse.output_fingerprint(
        con, output, registry, home, period=period, publication=publication, agreement_id=agreement_id, counted=counted
    )
    reused = reuse.reusable_build(con, output.name, fingerprint)
    if reused is not None:
        result = AggregateResult(output.name, False, {**reused, "rebuilt": False})
        result.statement = load_statement(con, output.name)
        result.violations = table_violations(con, output)
    else:
        built = build_output(
            con,
            output,
            registry,
            today=today,
            agreement_id=agreement_id,
            publication=publication,
            previous_folder=home.published,
            period=period,
            counted=counted,
        )
        metadata = {"rows_in": built.observed_cells, "rows_out": built.grid_cells, **built.as_metadata()}
        result = AggregateResult(output.name, True, {**metadata, "rebuilt": True}, violations=list(built.violations))
        result.statement = build_statement(con, output, registry, home, built)
        store_statement(con, result.statement)
    result.guard = guard_table(con, f"published.{output.name}", output, registry)
    if result.rebuilt or not result.passed:
        remembered = {k: v for k, v in result.metadata.items() if k not in ("rebuilt", "built_at")}
        reuse.record_build(con, output.name, fingerprint if result.passed else None, remembered)
    return result
