"""Quality measures of each validated batch, per field, for the quality statements (CoP 4, 28-29).

Computed in the validation run from the checked rows (the typed values and ``failed_rules``
of ``safehaven.intake.rules.pass_sql``): the aggregates below ride in the one grouped query that
also counts each batch's rows, and the per-rule failure counts come from the failing rows
alone. Stored in ``governance.quality_measures``, one row per (batch, field, measure):

=================  =========  =================================================================
measure            field      value (``numerator`` / ``denominator``)
=================  =========  =================================================================
``rows``           ``*``      rows in the batch (value 1; numerator = denominator = rows)
``row_validity``   ``*``      rows that break no rule / rows (ESS accuracy)
``completeness``   each       rows where the field has a value / rows
``validity``       each       values that break none of the field's own value rules (type,
                              format, NHS number, code list, allowed set, range) / values
                              given; NULL when no value was given
``uniqueness``     patient    distinct patient keys / rows, over the rows that break no rule
                   key        (1.0: one row per person; GP events: about 1 / events per person)
``date_coverage``  period     calendar months holding at least one valid row / months from the
                   field      earliest to the latest valid date; ``period_start`` and
                              ``period_end`` hold those dates (whole months when the field is
                              not of class ``content``)
=================  =========  =================================================================

A field's value rules are mutually exclusive (a value that does not parse cannot be out of
range), so its invalid values are the sum of its value rules' failures. Only counts, shares
and the period's bounds are stored: no value of a record. Measures are recorded for every
batch, accepted or refused, so quality can be followed over time.

Beside them, ``governance.validation_rule_results`` holds, per batch and rule, the single
pass's failures (``sql_failures``: rows that break the rule) and Great Expectations' result
(written by ``safehaven.intake.validation``). Both tables are read by the quality statements
(``safehaven.publish.quality``), which therefore need neither the validation code nor the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import duckdb

from safehaven.core import schema
from safehaven.core.sql import lit, q
from safehaven.core.store import insert_values
from safehaven.intake.contracts import Contract
from safehaven.intake.rules import RuleCheck, raw_column
from safehaven.publish.outputs import month_end, months_spanned

MEASURES_TABLE = schema.QUALITY_MEASURES
RULE_RESULTS = schema.VALIDATION_RULE_RESULTS
BATCH = "*"

#: Kinds of rule that judge one field's own value (not presence, not other fields).
VALUE_RULES = ("type", "nhs_number", "format", "code_list", "allowed", "range")


def ensure_table(con: duckdb.DuckDBPyConnection) -> None:
    """The quality measures table (one row per batch, field and measure)."""
    schema.ensure(con, MEASURES_TABLE)


def ensure_rule_results_table(con: duckdb.DuckDBPyConnection) -> None:
    """The per-batch, per-rule validation results (one row per batch and rule, the row-level tolerance included)."""
    schema.ensure(con, RULE_RESULTS)


@dataclass(frozen=True)
class Measure:
    batch_id: str
    field: str
    measure: str
    numerator: int | None
    denominator: int | None
    period_start: date | None = None
    period_end: date | None = None

    @property
    def value(self) -> float | None:
        if self.numerator is None or not self.denominator:
            return None
        return self.numerator / self.denominator


def aggregates(contract: Contract) -> list[tuple[str, str]]:
    """(key, SQL aggregate) over the checked rows of one batch, for ``build_measures``."""
    valid = "len(failed_rules) = 0"
    parts = [("rows", "count(*)"), ("valid_rows", f"count_if({valid})")]
    # A required field's missing values are its ``required`` failures: only optional fields are counted here.
    parts += [(f"given:{f.name}", f"count({q(raw_column(f))})") for f in contract.fields if not f.required]
    parts.append(("key_distinct", f"count(DISTINCT {q(contract.patient_key)}) FILTER (WHERE {valid})"))
    if contract.period_field:
        pf = q(contract.period_field)
        parts += [
            ("period_min", f"min({pf}) FILTER (WHERE {valid})"),
            ("period_max", f"max({pf}) FILTER (WHERE {valid})"),
            ("period_months", f"count(DISTINCT year({pf}) * 12 + month({pf})) FILTER (WHERE {valid})"),
        ]
    return parts


def build_measures(
    contract: Contract, checks: list[RuleCheck], batch_id: str, values: dict[str, Any], failures_by_rule: dict[str, int]
) -> list[Measure]:
    """The measures of one batch from its aggregates and its failures per rule."""
    total = int(values["rows"])
    valid_rows = int(values["valid_rows"])
    measures = [
        Measure(batch_id, BATCH, "rows", total, total),
        Measure(batch_id, BATCH, "row_validity", valid_rows, total),
    ]
    for spec in contract.fields:
        if spec.required:
            given = total - failures_by_rule.get(f"{spec.name}.required", 0)
        else:
            given = int(values[f"given:{spec.name}"])
        invalid = sum(
            failures_by_rule.get(c.id, 0) for c in checks if c.kind in VALUE_RULES and c.fields == (spec.name,)
        )
        measures.append(Measure(batch_id, spec.name, "completeness", given, total))
        measures.append(Measure(batch_id, spec.name, "validity", given - invalid, given))
    measures.append(Measure(batch_id, contract.patient_key, "uniqueness", int(values["key_distinct"]), valid_rows))
    if contract.period_field:
        first, last = values["period_min"], values["period_max"]
        assert first is None or isinstance(first, date)
        assert last is None or isinstance(last, date)
        span = months_spanned(first, last) if first and last else 0
        if first and last and contract.field(contract.period_field).identifiability != "content":
            first, last = first.replace(day=1), month_end(last)
        measures.append(
            Measure(batch_id, contract.period_field, "date_coverage", int(values["period_months"]), span, first, last)
        )
    return measures


def store_measures(con: duckdb.DuckDBPyConnection, contract: Contract, measures: list[Measure]) -> None:
    """Insert (or replace) the measures of the batches; call inside the validation transaction."""
    ensure_table(con)
    if not measures:
        return
    batches = sorted({m.batch_id for m in measures})
    con.execute(f"DELETE FROM {MEASURES_TABLE} WHERE batch_id IN ({', '.join(lit(b) for b in batches)})")
    insert_values(
        con,
        MEASURES_TABLE,
        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
        [
            [
                m.batch_id,
                contract.collection,
                contract.version,
                m.field,
                m.measure,
                m.value,
                m.numerator,
                m.denominator,
                m.period_start,
                m.period_end,
            ]
            for m in measures
        ],
    )
