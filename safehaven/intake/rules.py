"""Contracts compiled to SQL: one place where each rule becomes a predicate.

Every rule of a contract (CoP 7-9, 45-46; the rule list is in ``safehaven.intake.contracts``) becomes
a ``RuleCheck``: an identifier such as ``nhs_number.nhs_number`` or
``discharge_not_before_admission``, and a DuckDB SQL predicate that is true when a row
satisfies it. A missing value fails only the field's ``required`` rule; every other rule
passes on NULL, so each failure has one cause.

Type each value once (the speed rule). A landed row is all text. ``typed_projection`` turns
it into typed columns *once per row*: the trimmed text of each field (``_raw_<field>``, for
fields whose type is not text), the field in its contract type (the canonical NHS number,
the upper-cased postcode, the parsed date) and helper columns (the NHS number as an integer
for the check digit, duplicate flags for uniqueness declarations). ``compile_checks``
returns predicates over those columns, so no canonicalising regex or date parse is repeated
per rule. ``pass_sql`` is the whole single pass: typed values plus ``failed_rules`` (the ids
of the rules a row breaks) in one ``SELECT``. ``compile_checks(..., over="landed")`` gives
the same predicates written directly over the landed text columns (slower; for ad hoc
queries and tests over a raw file). Other measured choices (DuckDB 1.4, 6.7M rows): a code
list is ``list_contains([...], value)``, four times faster than ``value IN (...)`` with
tens of codes; the NHS number's shape is a ``GLOB``; its check digit is two lookups in
precomputed weighted sums of five-digit halves (``nhs_check_digit_lookup_sql``); and the
list of broken rules is built only for rows that break one.

The compiled predicates feed the row-level quarantine (``safehaven.intake.validation``) and are the
rules that ``safehaven.intake.expectations`` compiles to Great Expectations; both read the regexes,
code lists and date bounds from here, so they cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Literal

from safehaven.core.days import haven_today
from safehaven.core.identifiers import (
    CHECK_WEIGHTS,
    canonical_nhs_sql,
    check_weights_sql,
    nhs_check_digit_lookup_sql,
    nhs_valid_sql,
    spreadsheet_sql,
)
from safehaven.core.identifiers import NHS_RE as NHS_RE  # re-exported: the rules read their regexes here
from safehaven.core.identifiers import SPREADSHEET_RE as SPREADSHEET_RE
from safehaven.core.sql import lit, q
from safehaven.intake.contracts import Contract, ContractRegistry, FieldSpec

#: UK postcode shape (outward code, optional space, inward code), after upper-casing.
POSTCODE_RE = r"[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}"
#: ODS organisation code: three to six upper-case letters and digits.
ODS_RE = r"[A-Z0-9]{3,6}"
#: ONS GSS geography code: country letter and eight digits.
GSS_RE = r"[EWSN][0-9]{8}"
#: The same as a GLOB pattern (a third faster than the regex in DuckDB 1.4).
NHS_GLOB = "[0-9]" * 10
FORMAT_RE: dict[str, str] = {"uk_postcode": POSTCODE_RE, "ods_code": ODS_RE, "gss_code": GSS_RE}
#: The only letters a rule ignores the case of: ASCII. ``upper()`` in DuckDB and case-insensitive
#: RE2 fold other letters too, each its own way (DuckDB maps the dotless i, U+0131, to I and the
#: long s, U+017F, to S; RE2 folds the Kelvin sign, U+212A, to K), so a look-alike letter would
#: meet a rule, or not, depending on which side checked it. Upper-casing ASCII text alone
#: (``ascii_upper_sql``) and matching either case of ASCII letters alone (``prefix3_regex``)
#: leave every other character as it is, and a code or postcode holding one fails its rule on
#: both sides.
ASCII_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Bounds of a date rule without ``min`` or ``max``.
EARLIEST, LATEST = date(1, 1, 1), date(9999, 12, 31)

#: Prefix of the trimmed-text column kept beside a typed (non-text) field.
RAW = "_raw_"
#: Prefix of the NHS number as an integer (a helper of the check digit; not stored).
NHS_INT = "_int_"
#: Prefix of a uniqueness declaration's duplicate flag (a helper; not stored).
DUPLICATE = "_dup_"

#: The id under which the row-level tolerance (the share of a batch's rows that break any rule)
#: is reported beside the rules: a GX expectation over the pass's result (``safehaven.intake.expectations``).
ROWS_RULE = "rows.within_tolerance"

RuleKind = Literal[
    "required", "type", "nhs_number", "spreadsheet", "format", "code_list", "allowed", "range", "order", "unique"
]


def date_lit(value: date) -> str:
    return f"DATE '{value.isoformat()}'"


def ascii_sql(expr: str) -> str:
    """SQL boolean: ``expr`` is ASCII text (its UTF-8 length in bytes equals its length in characters)."""
    return f"strlen({expr}) = length({expr})"


def ascii_upper_sql(expr: str) -> str:
    """``expr`` upper-cased if it is ASCII text (a-z to A-Z, nothing else changes), else unchanged.

    A value holding any other character is left as given, so no look-alike letter is folded
    into an ASCII one (see ``ASCII_UPPER``); it fails every rule that upper-cases. DuckDB's
    ``translate`` would fold a-z alone in any text, but runs eight times slower than this.
    """
    return f"CASE WHEN {ascii_sql(expr)} THEN upper({expr}) ELSE {expr} END"


def text_sql(field: str) -> str:
    """The field's landed text, trimmed, with empty strings as NULL."""
    return f"nullif(trim({q(field)}), '')"


def typed_sql(spec: FieldSpec) -> str:
    """The field's value in its contract type over the landed text (NULL where it does not parse).

    Canonical forms: the NHS number without separators (``safehaven.core.identifiers``), the
    postcode upper-cased if it is ASCII (``ascii_upper_sql``: a look-alike letter is never
    folded into an ASCII one, so it fails the format), dates parsed strictly as ISO 8601
    ``YYYY-MM-DD``.
    """
    raw = text_sql(spec.name)
    if spec.rule and spec.rule.format == "nhs_number":
        return canonical_nhs_sql(raw)
    if spec.rule and spec.rule.format == "uk_postcode":
        return ascii_upper_sql(raw)
    if spec.type == "DATE":
        return f"CAST(try_strptime({raw}, '%Y-%m-%d') AS DATE)"
    if spec.type == "VARCHAR":
        return raw
    return f"TRY_CAST({raw} AS {spec.type})"


def raw_column(spec: FieldSpec) -> str:
    """The name of the column whose NULL means "no value given" for ``spec``.

    For text fields it is the typed field itself (empty text and, for an NHS number, a value
    of separators only, count as missing); for other types the trimmed text beside it.
    """
    return spec.name if spec.type == "VARCHAR" else RAW + spec.name


@dataclass(frozen=True)
class TypedColumn:
    """One column of the typed projection: its name, SQL over the landed text, and type."""

    name: str
    sql: str
    type: str


def typed_projection(contract: Contract) -> list[TypedColumn]:
    """The stored columns of the single pass, each computed once per row, in contract order."""
    columns: list[TypedColumn] = []
    for spec in contract.fields:
        if spec.type != "VARCHAR":
            columns.append(TypedColumn(RAW + spec.name, text_sql(spec.name), "VARCHAR"))
        columns.append(TypedColumn(spec.name, typed_sql(spec), spec.type))
    return columns


def helper_projection(contract: Contract) -> list[TypedColumn]:
    """Columns over the typed projection that rules read but validation does not keep."""
    helpers: list[TypedColumn] = []
    for spec in contract.fields:
        if spec.rule and spec.rule.format == "nhs_number":
            value = q(spec.name)
            helpers.append(
                TypedColumn(
                    NHS_INT + spec.name,
                    f"CASE WHEN {value} GLOB '{NHS_GLOB}' THEN CAST({value} AS BIGINT) END",
                    "BIGINT",
                )
            )
    for key in contract.unique:
        cols = [q(f) for f in key.fields]
        missing = " OR ".join(f"{c} IS NULL" for c in cols)
        helpers.append(
            TypedColumn(
                DUPLICATE + key.id,
                f"CASE WHEN {missing} THEN false ELSE row_number() OVER (PARTITION BY _b, {', '.join(cols)} "
                "ORDER BY _row) > 1 END",
                "BOOLEAN",
            )
        )
    return helpers


@dataclass(frozen=True)
class RuleCheck:
    """One rule: its id, kind, what it checks, the fields it reads, and its SQL predicate."""

    id: str
    description: str
    fields: tuple[str, ...]
    valid_sql: str
    kind: RuleKind = "format"


def _given(spec: FieldSpec, typed: bool) -> str:
    """The field as given (its text), over the typed projection or the landed columns."""
    if typed:
        return q(raw_column(spec))
    return typed_sql(spec) if spec.type == "VARCHAR" else text_sql(spec.name)


def _value_rule(spec: FieldSpec, registry: ContractRegistry, val: str, typed: bool) -> tuple[RuleKind | None, str]:
    """The kind and predicate of a field's value rule: NHS number, format, code list or allowed values."""
    rule = spec.rule
    assert rule is not None
    if rule.format == "nhs_number":
        number = q(NHS_INT + spec.name) if typed else f"CAST({val} AS BIGINT)"
        return "nhs_number", (
            f"({number} IS NOT NULL AND {nhs_check_digit_lookup_sql(number)})" if typed else nhs_valid_sql(val)
        )
    if rule.format in FORMAT_RE:
        return "format", f"regexp_full_match({val}, '{FORMAT_RE[rule.format]}')"
    if rule.allowed is not None or rule.code_list is not None:
        values = code_values(spec, registry)
        kind: RuleKind = "code_list" if rule.code_list else "allowed"
        if rule.match == "prefix3":
            return kind, prefix3_sql(val, values)
        return kind, f"list_contains([{', '.join(lit(v) for v in values)}], {val})"
    return None, ""


def prefix3_codes(values: list[str]) -> list[str]:
    """The codes a ``match: prefix3`` value can meet: ASCII, three characters or fewer, upper-cased, sorted."""
    return sorted({v.upper() for v in values if len(v) <= 3 and v.isascii()})


def prefix3_sql(value: str, values: list[str]) -> str:
    """``match: prefix3`` in SQL: the value is ASCII and its first three characters, upper-cased, are a code.

    A code shorter than three characters must be the whole value. A value holding any other
    character (a look-alike letter such as the Kelvin sign, a full-width digit) fails
    (``ascii_sql``), so ``upper`` folds ASCII letters alone. Its Great Expectations twin is
    ``prefix3_regex``.
    """
    codes = ", ".join(lit(v) for v in prefix3_codes(values))
    return f"({ascii_sql(value)} AND list_contains([{codes}]::VARCHAR[], upper(left({value}, 3))))"


def _ascii_caseless(code: str) -> str:
    """A regex for ``code`` matching either case of its ASCII letters only (``K`` -> ``[Kk]``)."""
    return "".join(f"[{c}{c.lower()}]" if c in ASCII_UPPER else re.escape(c) for c in code)


def prefix3_regex(values: list[str]) -> str:
    """``match: prefix3`` as an anchored regex (for GX), equal to ``prefix3_sql`` on every text value.

    Three-character codes match as prefixes of an ASCII value; shorter codes must be the
    whole value; longer codes can never equal a three-character prefix and are left out. Case
    is ignored for ASCII letters alone, by character classes (``[Kk]21``), never by the ``(?i)``
    flag: RE2 folds the Kelvin sign into K under it, while ``prefix3_sql`` does not.
    """
    codes = prefix3_codes(values)
    three = [_ascii_caseless(v) for v in codes if len(v) == 3]
    short = [_ascii_caseless(v) for v in codes if len(v) < 3]
    parts = ([f"(?:{'|'.join(three)})[\\x00-\\x7F]*"] if three else []) + ([f"(?:{'|'.join(short)})"] if short else [])
    return f"^(?:{'|'.join(parts)})$" if parts else "^$a"  # "^$a" matches nothing


def _presence_checks(spec: FieldSpec, present: str, val: str) -> list[RuleCheck]:
    """A required field is present; a typed field's text is a valid value of its type."""
    checks = []
    if spec.required:
        checks.append(
            RuleCheck(
                f"{spec.name}.required", f"{spec.name} is present", (spec.name,), f"{present} IS NOT NULL", "required"
            )
        )
    if spec.type != "VARCHAR":
        checks.append(
            RuleCheck(
                f"{spec.name}.type",
                f"{spec.name} is a valid {spec.type}",
                (spec.name,),
                f"({present} IS NULL OR {val} IS NOT NULL)",
                "type",
            )
        )
    return checks


def _field_checks(spec: FieldSpec, registry: ContractRegistry, today: date, typed: bool) -> list[RuleCheck]:
    """Every check of one field, in a stable order: required, type, value rule, range."""
    val = q(spec.name) if typed else typed_sql(spec)
    checks = _presence_checks(spec, _given(spec, typed), val)
    rule = spec.rule
    if rule is None:
        return checks
    kind, predicate = _value_rule(spec, registry, val, typed)
    if kind is not None:
        checks.append(
            RuleCheck(
                f"{spec.name}.{kind}",
                f"{spec.name} meets its {kind.replace('_', ' ')} rule",
                (spec.name,),
                f"({val} IS NULL OR coalesce({predicate}, false))",
                kind,
            )
        )
    if rule.format == "nhs_number":
        checks.append(spreadsheet_check(spec, val, q(NHS_INT + spec.name) if typed else None))
    if rule.min is not None or rule.max is not None:
        low, high = date_bounds(spec, today)
        checks.append(
            RuleCheck(
                f"{spec.name}.range",
                f"{spec.name} is between {low} and {high}",
                (spec.name,),
                f"({val} IS NULL OR {val} BETWEEN {date_lit(low)} AND {date_lit(high)})",
                "range",
            )
        )
    return checks


def compile_checks(
    contract: Contract,
    registry: ContractRegistry,
    today: date | None = None,
    over: Literal["typed", "landed"] = "landed",
) -> list[RuleCheck]:
    """Every rule of ``contract`` as a SQL predicate, in a stable order.

    ``over="typed"``: predicates over the columns of ``typed_projection`` and
    ``helper_projection`` (the single pass). ``over="landed"``: the same predicates inlined
    over the landed text columns; uniqueness declarations are left out there (they need the
    whole batch: a window). ``today`` fixes what "no future dates" means for one validation
    run (the GX suite is compiled with the same day).
    """
    today = today or haven_today()
    typed = over == "typed"

    def value(spec: FieldSpec) -> str:
        return q(spec.name) if typed else typed_sql(spec)

    checks: list[RuleCheck] = []
    for spec in contract.fields:
        checks += _field_checks(spec, registry, today, typed)
    for rule in contract.rules:
        later, earlier = value(contract.field(rule.later)), value(contract.field(rule.earlier))
        checks.append(
            RuleCheck(
                rule.id, rule.description, (rule.later, rule.earlier), f"coalesce({later} >= {earlier}, true)", "order"
            )
        )
    if typed:
        for key in contract.unique:
            checks.append(
                RuleCheck(key.id, key.description, tuple(key.fields), f"NOT {q(DUPLICATE + key.id)}", "unique")
            )
    return checks


def spreadsheet_check(spec: FieldSpec, value: str, number: str | None) -> RuleCheck:
    """``<field>.spreadsheet``: an NHS number is not a spreadsheet's float or scientific rendering.

    Such a value also fails the NHS number rule; this rule names the cause, so a person can
    see that the file went through a spreadsheet (``safehaven.core.identifiers``). Over the
    typed projection, ``number`` (ten digits as an integer) short-cuts the valid rows.
    """
    shortcut = f"{number} IS NOT NULL OR " if number else ""
    return RuleCheck(
        f"{spec.name}.spreadsheet",
        f"{spec.name} is not a spreadsheet rendering of a number (such as 9434765919.0 or 9.43E+09)",
        (spec.name,),
        f"({shortcut}{value} IS NULL OR NOT coalesce({spreadsheet_sql(value)}, false))",
        "spreadsheet",
    )


def date_bounds(spec: FieldSpec, today: date) -> tuple[date, date]:
    """The plausible range of a date field (``max: today`` is the day of validation)."""
    rule = spec.rule
    assert rule is not None
    low = rule.min or EARLIEST
    high = today if rule.max == "today" else rule.max if isinstance(rule.max, date) else LATEST
    return low, high


def code_values(spec: FieldSpec, registry: ContractRegistry) -> list[str]:
    """The values a field's allowed set or code list admits."""
    rule = spec.rule
    assert rule is not None
    if rule.allowed is not None:
        return list(rule.allowed)
    return registry.code_list(rule.code_list or "").code_values


def failed_rules_sql(checks: list[RuleCheck]) -> str:
    """SQL list of the ids of the rules a row breaks: built only for rows that break one.

    A valid row (the great majority) gets an empty list from one conjunction of the
    predicates; the list of ids is assembled for the others alone.
    """
    all_valid = " AND ".join(f"({c.valid_sql})" for c in checks) or "true"
    items = ", ".join(f"CASE WHEN NOT ({c.valid_sql}) THEN {lit(c.id)} END" for c in checks)
    return f"CASE WHEN {all_valid} THEN []::VARCHAR[] ELSE list_filter([{items}], x -> x IS NOT NULL) END"


def pass_sql(contract: Contract, registry: ContractRegistry, table: str, batches: list[str], today: date) -> str:
    """The single pass over ``batches`` of ``table`` (the landed, all-text rows).

    Columns: ``_b`` (the batch's position in ``batches``, from 1: a small integer is cheaper
    to group and filter on than the batch's SHA-256), ``_row``, the typed projection and
    ``failed_rules``. Each field is trimmed, canonicalised and parsed once (innermost
    projection), helpers are computed once over the typed values, and every rule reads
    those columns.
    """
    if len(batches) == 1:
        where, index = f"_batch = {lit(batches[0])}", "1"
    else:
        listed = "[" + ", ".join(lit(b) for b in batches) + "]"
        where, index = f"list_contains({listed}, _batch)", f"list_position({listed}, _batch)"
    typed = ", ".join(f"{c.sql} AS {q(c.name)}" for c in typed_projection(contract))
    helpers = helper_projection(contract)
    helper_sql = "".join(f", {c.sql} AS {q(c.name)}" for c in helpers)
    stored = ", ".join(q(c.name) for c in typed_projection(contract))
    checks = compile_checks(contract, registry, today, over="typed")
    weights = f", {check_weights_sql()} AS {CHECK_WEIGHTS}" if any(c.kind == "nhs_number" for c in checks) else ""
    return (
        f"SELECT _b, _row, {stored}, {failed_rules_sql(checks)} AS failed_rules FROM ("
        f"SELECT *{helper_sql} FROM (SELECT CAST({index} AS INTEGER) AS _b, _row, {typed} "
        f"FROM {table} WHERE {where})){weights}"
    )
