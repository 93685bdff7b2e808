"""Contracts compiled to Great Expectations 1.x suites over the typed values of the single pass.

Rule (CoP 7-9, 45-46; issue #3): every rule of a contract is checked by Great Expectations,
inside DuckDB (``safehaven.intake.gx_duckdb.run_suite``: SQL pushdown, counts only), on the *typed*
columns that the single SQL pass (``safehaven.intake.rules.pass_sql``) computed once per row. Each
expectation carries the rule's id in ``meta["id"]``; it evaluates the rule itself, not the
pass's verdict:

=================  ==========================================================================
rule kind          Great Expectations expectation
=================  ==========================================================================
``required``       ``expect_column_values_to_not_be_null`` on the value as given
``type``           ``expect_column_values_to_not_be_null`` on the typed value, where text was
                   given (``row_condition``: the ``_raw_`` column is not null)
``format``         ``expect_column_values_to_match_regex`` with the anchored format regex
                   (``^(?:...)$``: GX on DuckDB is a partial match, ``regexp_matches``)
``nhs_number``     the same regex, ``^[0-9]{10}$`` (the format part). The mod-11 check digit
                   has no GX expectation that runs as SQL: the single pass evaluates it and
                   its count is reported beside GX's (``evaluated_by = "gx+sql"``).
``spreadsheet``    ``expect_column_values_to_not_match_regex`` with the anchored float or
                   scientific rendering regex (``safehaven.core.identifiers.SPREADSHEET_RE``)
``code_list``,     ``expect_column_values_to_be_in_set`` with the code list; for ICD-10
``allowed``        style ``match: prefix3`` an anchored regex of the three-character codes
                   (``safehaven.intake.rules.prefix3_regex``), ignoring the case of ASCII
                   letters only, equal to the pass's ``prefix3_sql``: a non-ASCII look-alike
                   (the Kelvin sign for K, a dotless i) fails both
``range``          ``expect_column_values_to_be_between`` on the typed date
``order``          ``expect_column_pair_values_a_to_be_greater_than_b`` (``or_equal``, rows
                   with either value missing ignored)
``unique``         ``expect_compound_columns_to_be_unique`` (GX counts every row of a
                   duplicated key; the pass counts the repeats after the first, so these two
                   counts are reported side by side and not compared)
=================  ==========================================================================

Each expectation has ``mostly = 1 - tolerance``: a rule whose failures exceed the contract's
tolerance (of the values it checks) fails. One more expectation states the row-level
tolerance: the per-row count of broken rules (``_broken_rules``, from the pass) is 0 for at
least ``1 - tolerance`` of the rows. A union of failures across expectations is outside GX's
model, so this one reads the pass's per-row result; the others evaluate the data. The suite
succeeds exactly when the batch is within tolerance, and its result decides the blocking
check (``safehaven.intake.validation``).
"""

from __future__ import annotations

from safehaven.intake import gx_quiet

gx_quiet.apply()  # before the first import of great_expectations: validation imports this module first

from dataclasses import dataclass  # noqa: E402
from datetime import date  # noqa: E402
from typing import Any, Literal  # noqa: E402

import great_expectations as gx  # noqa: E402
from great_expectations.expectations.row_conditions import Column  # noqa: E402

from safehaven.intake.contracts import Contract, ContractRegistry  # noqa: E402
from safehaven.intake.rules import (  # noqa: E402
    FORMAT_RE,
    NHS_RE,
    RAW,
    ROWS_RULE,
    SPREADSHEET_RE,
    RuleCheck,
    code_values,
    compile_checks,
    date_bounds,
    prefix3_regex,
    raw_column,
)

E = gx.expectations

#: The per-row count of broken rules, exposed to GX beside the typed values.
BROKEN_RULES = "_broken_rules"

EvaluatedBy = Literal["gx", "gx+sql", "gx (pass result)"]


@dataclass(frozen=True)
class PlannedExpectation:
    """One GX expectation and the contract rule it evaluates.

    ``comparable``: GX's unexpected count must equal the single pass's failures of the rule
    (a cross-check). ``evaluated_by``: ``gx`` (GX evaluates the whole rule), ``gx+sql`` (GX
    the format, the pass the check digit), ``gx (pass result)`` (the row-level tolerance).
    """

    rule_id: str
    kind: str
    expectation: gx.expectations.Expectation
    comparable: bool
    evaluated_by: EvaluatedBy


def anchored(regex: str) -> str:
    """A whole-value regex for GX on DuckDB (``regexp_matches`` finds partial matches)."""
    return f"^(?:{regex})$"


def compile_suite(
    contract: Contract, registry: ContractRegistry, today: date, checks: list[RuleCheck] | None = None
) -> list[PlannedExpectation]:
    """The GX suite of ``contract``, one expectation per rule plus the row-level tolerance.

    ``today`` must be the day the single pass was compiled with (``max: today``).
    """
    checks = checks if checks is not None else compile_checks(contract, registry, today, over="typed")
    mostly = _mostly(contract.tolerance)
    planned: list[PlannedExpectation] = []
    for check in checks:
        planned.append(_plan(contract, registry, check, today, mostly))
    planned.append(
        PlannedExpectation(
            ROWS_RULE,
            "rows",
            E.ExpectColumnValuesToBeBetween(
                column=BROKEN_RULES, min_value=0, max_value=0, meta={"id": ROWS_RULE}, **mostly
            ),
            comparable=True,
            evaluated_by="gx (pass result)",
        )
    )
    return planned


def _mostly(tolerance: float) -> dict[str, Any]:
    return {"mostly": round(1.0 - tolerance, 12)} if tolerance > 0 else {}


def _plan(
    contract: Contract, registry: ContractRegistry, check: RuleCheck, today: date, mostly: dict[str, Any]
) -> PlannedExpectation:
    """The GX expectation of one rule check: a cross-field rule, or a rule on one field."""
    if check.kind in ("order", "unique"):
        return _plan_cross_field(contract, check, mostly)
    return _plan_field(contract, registry, check, today, mostly)


def _plan_cross_field(contract: Contract, check: RuleCheck, mostly: dict[str, Any]) -> PlannedExpectation:
    """An order rule (later >= earlier) or a uniqueness key."""
    meta = {"id": check.id}
    if check.kind == "order":
        rule = next(r for r in contract.rules if r.id == check.id)
        expectation: gx.expectations.Expectation = E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A=rule.later,
            column_B=rule.earlier,
            or_equal=True,
            ignore_row_if="either_value_is_missing",
            meta=meta,
            **mostly,
        )
        return PlannedExpectation(check.id, check.kind, expectation, True, "gx")
    key = next(u for u in contract.unique if u.id == check.id)
    if len(key.fields) == 1:
        expectation = E.ExpectColumnValuesToBeUnique(column=key.fields[0], meta=meta, **mostly)
    else:
        expectation = E.ExpectCompoundColumnsToBeUnique(
            column_list=list(key.fields), ignore_row_if="any_value_is_missing", meta=meta, **mostly
        )
    return PlannedExpectation(check.id, check.kind, expectation, False, "gx")


def _code_expectation(
    spec: Any, registry: ContractRegistry, meta: dict[str, Any], mostly: dict[str, Any]
) -> gx.expectations.Expectation:
    """A code list or allowed-values rule: in the set, or (``prefix3``) matching a code's first three characters."""
    assert spec.rule
    values = code_values(spec, registry)
    if spec.rule.match == "prefix3":
        return E.ExpectColumnValuesToMatchRegex(column=spec.name, regex=prefix3_regex(values), meta=meta, **mostly)
    return E.ExpectColumnValuesToBeInSet(column=spec.name, value_set=values, meta=meta, **mostly)


def _plan_field(
    contract: Contract, registry: ContractRegistry, check: RuleCheck, today: date, mostly: dict[str, Any]
) -> PlannedExpectation:
    """A rule on one field: required, type, NHS number, format, code list, allowed values, range."""
    meta = {"id": check.id}
    spec = contract.field(check.fields[0])
    if check.kind == "nhs_number":
        expectation = E.ExpectColumnValuesToMatchRegex(column=spec.name, regex=anchored(NHS_RE), meta=meta, **mostly)
        return PlannedExpectation(check.id, check.kind, expectation, False, "gx+sql")
    expectation = _field_expectation(check.kind, spec, registry, today, meta, mostly)
    return PlannedExpectation(check.id, check.kind, expectation, True, "gx")


def _field_expectation(
    kind: str, spec: Any, registry: ContractRegistry, today: date, meta: dict[str, Any], mostly: dict[str, Any]
) -> gx.expectations.Expectation:
    """The expectation of a one-field rule other than the NHS number's."""
    if kind == "required":
        return E.ExpectColumnValuesToNotBeNull(column=raw_column(spec), meta=meta, **mostly)
    if kind == "type":
        return E.ExpectColumnValuesToNotBeNull(
            column=spec.name,
            row_condition=Column(RAW + spec.name).is_not_null(),
            condition_parser="great_expectations",
            meta=meta,
            **mostly,
        )
    if kind == "spreadsheet":
        return E.ExpectColumnValuesToNotMatchRegex(
            column=spec.name, regex=anchored(SPREADSHEET_RE), meta=meta, **mostly
        )
    if kind == "format":
        assert spec.rule and spec.rule.format
        return E.ExpectColumnValuesToMatchRegex(
            column=spec.name, regex=anchored(FORMAT_RE[spec.rule.format]), meta=meta, **mostly
        )
    if kind in ("code_list", "allowed"):
        return _code_expectation(spec, registry, meta, mostly)
    if kind == "range":
        low, high = date_bounds(spec, today)
        return E.ExpectColumnValuesToBeBetween(
            column=spec.name, min_value=low.isoformat(), max_value=high.isoformat(), meta=meta, **mostly
        )
    raise ValueError(f"no expectation for rule kind {kind!r}")  # pragma: no cover - every kind is handled above
