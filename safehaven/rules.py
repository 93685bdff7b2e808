"""Contracts compiled to SQL: one place where each rule becomes a predicate.

Every rule of a contract (CoP 7-9, 45-46) becomes a ``RuleCheck``: an identifier such as
``nhs_number.nhs_number`` or ``discharge_not_before_admission``, and a DuckDB SQL predicate
that is true when a landed (all-text) row satisfies it. A missing value fails only the
field's ``required`` rule; every other rule passes on NULL, so each failure has one cause.

The same checks feed the row-level quarantine (one SQL pass, ``safehaven.validation``) and
the Great Expectations suite built from the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

from safehaven.contracts import Contract, ContractRegistry, FieldSpec
from safehaven.identifiers import canonical_nhs_sql, nhs_valid_sql

#: UK postcode shape (outward code, optional space, inward code), after upper-casing.
POSTCODE_RE = r"[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}"
#: ODS organisation code: three to six upper-case letters and digits.
ODS_RE = r"[A-Z0-9]{3,6}"
#: ONS GSS geography code: country letter and eight digits.
GSS_RE = r"[EWSN][0-9]{8}"


def q(name: str) -> str:
    """Quote an identifier for DuckDB."""
    return '"' + name.replace('"', '""') + '"'


def lit(value: str) -> str:
    """Quote a string literal for DuckDB."""
    return "'" + value.replace("'", "''") + "'"


def text_sql(field: str) -> str:
    """The field's raw text, trimmed, with empty strings as NULL."""
    return f"nullif(trim({q(field)}), '')"


def typed_sql(spec: FieldSpec) -> str:
    """The field's value in its contract type (NULL where it does not parse)."""
    raw = text_sql(spec.name)
    if spec.rule and spec.rule.format == "nhs_number":
        return canonical_nhs_sql(raw)
    if spec.rule and spec.rule.format == "uk_postcode":
        return f"upper({raw})"
    if spec.type == "DATE":
        return f"try_strptime({raw}, '%Y-%m-%d')::DATE"
    if spec.type == "VARCHAR":
        return raw
    return f"TRY_CAST({raw} AS {spec.type})"


@dataclass(frozen=True)
class RuleCheck:
    """One rule: its id, what it checks, the fields it reads, and its SQL predicate."""

    id: str
    description: str
    fields: tuple[str, ...]
    valid_sql: str


def compile_checks(contract: Contract, registry: ContractRegistry) -> list[RuleCheck]:
    """Every rule of ``contract`` as SQL predicates over the landed text columns."""
    checks: list[RuleCheck] = []
    for spec in contract.fields:
        raw, typed = text_sql(spec.name), typed_sql(spec)
        if spec.required:
            checks.append(
                RuleCheck(f"{spec.name}.required", f"{spec.name} is present",
                          (spec.name,), f"{raw} IS NOT NULL")
            )
        if spec.type != "VARCHAR":
            checks.append(
                RuleCheck(f"{spec.name}.type", f"{spec.name} is a valid {spec.type}",
                          (spec.name,), f"({raw} IS NULL OR {typed} IS NOT NULL)")
            )
        rule = spec.rule
        if rule is None:
            continue
        predicate: str | None = None
        kind = ""
        if rule.format == "nhs_number":
            kind, predicate = "nhs_number", nhs_valid_sql(typed)
        elif rule.format == "uk_postcode":
            kind, predicate = "format", f"regexp_full_match({typed}, '{POSTCODE_RE}')"
        elif rule.format == "ods_code":
            kind, predicate = "format", f"regexp_full_match({typed}, '{ODS_RE}')"
        elif rule.format == "gss_code":
            kind, predicate = "format", f"regexp_full_match({typed}, '{GSS_RE}')"
        elif rule.allowed is not None or rule.code_list is not None:
            values = rule.allowed or registry.code_list(rule.code_list or "").code_values
            probe = f"upper(left({typed}, 3))" if rule.match == "prefix3" else typed
            kind = "code_list" if rule.code_list else "allowed"
            predicate = f"{probe} IN ({', '.join(lit(v) for v in values)})"
        if predicate is not None:
            checks.append(
                RuleCheck(f"{spec.name}.{kind}", f"{spec.name} meets its {kind} rule",
                          (spec.name,), f"({raw} IS NULL OR coalesce({predicate}, false))")
            )
        if rule.min is not None or rule.max is not None:
            low = f"DATE '{rule.min.isoformat()}'" if rule.min else "DATE '0001-01-01'"
            high = (
                "current_date" if rule.max == "today"
                else f"DATE '{rule.max.isoformat()}'" if rule.max else "DATE '9999-12-31'"
            )
            checks.append(
                RuleCheck(f"{spec.name}.range", f"{spec.name} is a plausible date",
                          (spec.name,), f"({typed} IS NULL OR {typed} BETWEEN {low} AND {high})")
            )
    for rule in contract.rules:
        later, earlier = typed_sql(contract.field(rule.later)), typed_sql(contract.field(rule.earlier))
        checks.append(
            RuleCheck(rule.id, rule.description, (rule.later, rule.earlier),
                      f"coalesce({later} >= {earlier}, true)")
        )
    return checks
