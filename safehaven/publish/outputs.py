"""The anonymised aggregates the haven publishes: declared in YAML, counted in DuckDB, protected.

An output is declared in ``data_contracts/outputs/<name>.yaml`` (:class:`Output`): its title,
purpose and users (ESS *relevance*), the collections it reads, its dimensions with their
domains, its measures, its disclosure-control policy and the SQL that counts people per cell.
Adding an output is a reviewed YAML change, like adding a collection's contract; the rules
below apply to every output without code. Rules (CoP 28-29, 34b, 35; ISB 1523; guide Rule 3
part A; ``docs/rules.md`` "Statistical disclosure control"):

* **People, per reporting month.** Every output counts distinct people (haven pseudonyms)
  per cell, per calendar month of the *reporting period*: from the first month any of its
  collections covers to the last month all of them cover, never past the last complete
  month before the run (a month still under way would be revised at the next release;
  its records wait, and the quality statement says how many). The SQL sees the months as
  the temporary table ``reporting_months(month, month_end)``, and the months being counted now
  as ``counting_months`` (``safehaven.publish.counting``: a month can be counted alone); a dated
  record joins the month it is counted in on ``m.month = date_trunc('month', <date>)`` of
  ``counting_months`` (for a DATE, the same month as ``<date> BETWEEN m.month AND m.month_end``,
  found by a hash join instead of a range join).
* **The SQL only reads the haven** (``safehaven.publish.sql_gate``): an output's SQL, and any
  domain's, is one ``SELECT`` over ``haven.<collection>`` of its declared collections, the
  ``reporting_months`` and ``counting_months`` tables, its CTEs and the helpers below; anything else (a second
  statement, a write, ``ATTACH``, a function that reads files, another zone) is refused when
  the declaration loads, and the SQL runs in a ``READ ONLY`` transaction.
* **Helpers: lookups are joins.** The SQL may also use the temporary macros of :data:`MACROS`:
  ``codes('<list>')``, a code list as a relation ``(code, display, grp)``; ``age_band(born,
  on_day)`` and ``age_years``; ``sex_category(group)``, a ``person_gender`` group as Male,
  Female or Not known. A code is looked up with ``LEFT JOIN codes('<list>') c ON c.code =
  <expr>``: a code not in the list, or NULL, joins no entry and its group is NULL, which the
  SQL maps to a category (``coalesce(c.grp, 'Unknown')``). Codes are unique within a list
  (``safehaven.intake.contracts.CodeList``), so the join never multiplies records. *Why joins:* a
  lookup per row as a scalar subquery is a correlated subquery, which DuckDB runs by buffering
  the whole input; for ``gp_activity`` at 909k people joins cut peak memory from 3.6 to 1.2 GiB
  and the time by 30% (benchmark, README "Performance").
* **The full grid.** Cells are the cross product of every dimension's *domain* (the
  reporting months, a code list, a fixed list, a query, or the values observed), so an
  empty cell is published as a true 0 rather than left out: an absent row is an unstated
  zero, and it would shrink a margin group (sometimes to one cell, which then gets no
  secondary protection). A query that yields a cell outside the declared grid, or a NULL
  dimension value, is refused: the declaration is wrong.
* **Zeros are a stated policy: sampling zeros and structural zeros** (Hundepool et al. 2012,
  *Statistical Disclosure Control*, Wiley, ch. 5 on frequency tables, and ONS disclosure
  control guidance for tables: a *sampling* zero is a possible cell in which no one happens
  to be, a *structural* zero a combination that cannot occur; ISB 1523 asks that zero cells
  be considered for the risk they carry). Every output states ``zeros: {publish, structural}``
  (:class:`ZerosSpec`); a declaration without it is refused when it loads, naming the file and
  the key. ``publish`` says whether sampling zeros are published as 0 (``Policy.suppress_zeros``
  is its negation). ``structural`` lists the impossible combinations as ``{match: {dimension:
  value or [values]}, reason}``: their cells are deleted from the true grid before protection
  (:func:`remove_structural_zeros`, one SQL statement), so they are never suppressed, never a
  secondary and not rows of the published table (suppressing a cell everyone knows is 0 protects
  nothing, and keeping it dilutes its margins); the quality statement lists the declarations
  and the cells they removed. A declared structural zero with people in it (a true count above
  0) refuses the output, naming it and the declaration: people are never dropped silently.
* **Disclosure control before the published zone.** True counts live only inside the store:
  per month in ``counts.<output>`` (``safehaven.publish.counting``), and on the full grid in a
  temporary table of the connection; ``safehaven.publish.disclosure.protect`` applies the output's policy
  (suppress 1-7, round to 5 or midpoint 6, secondary suppression over every margin, rates
  from published values, totals from published cells if asked), and the table written to
  ``published.<name>`` is the *public form* (one boolean ``suppressed`` marker, text
  neutralised; ``disclosure.public_select_sql``). :func:`build_output` then proves the
  invariants on that very table (``check_invariants``) and reports violations for the
  blocking asset check; the publication step proves them again before any file is written.
* **Distinct people do not add up** across months, diagnosis groups, chapters or services
  (one person can be in several), so no output publishes a "total" over such a dimension:
  it would not be a count of people. Secondary suppression still protects every margin,
  because a near-additive margin published elsewhere (a practice's list size, a provider's
  admissions) nearly recovers a lone suppressed cell.
* **Labels after protection.** Dimensions are codes with resolvable code systems (CoP 46);
  a dimension may add a label column from its code list after disclosure control, so a
  code and its label are never two dimensions (which would break the margins).
* **Observed values are held by enough people.** A dimension whose domain is ``observed``
  publishes values read from the data as row labels, so each must be held by more distinct
  people over the reporting period than the output's disclosure threshold, or the build is
  refused; its expression must be the counted row's own value (plain columns of the alias whose
  ``pid`` is counted, traced through CTEs; no other alias, subquery, aggregate or window; never
  ``pid``), or it is refused when the declaration loads. A ``domain: {sql: ...}`` that reads a
  haven table is held to the same bar in the rows its own SQL reads; a ``values`` or
  ``code_list`` domain is exactly its declared values (``_domain_sql``), so no value the data
  chose is a label under it (``safehaven.publish.observed``).
* **Linkage only under an agreement.** An output that reads more than one collection names its
  linkage, naming exactly those collections, or it is refused when the declarations load
  (:meth:`Output._linkage_declared`); its asset must obtain
  ``safehaven.share.linkage.authorise_linkage`` first, over the
  agreements as the store decided them (``safehaven.share.approvals.effective_agreements``:
  an agreement file's own ``approval:`` block authorises nothing), and pass the authorising
  agreement's id here, which refuses to run the join without it (CoP 22, 42b;
  :func:`require_agreement`, also for an output reading several collections without a linkage).
* Anonymised aggregates include everyone: the national data opt-out covers confidential
  information only (``docs/rules.md`` "Objections"); GP records a type 1 objection says were
  never to be sent are not in the haven (dropped at entry, or when the objection arrives after
  them: ``safehaven.protect.haven.purge_late_type1``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import duckdb
from pydantic import Field, field_validator, model_validator

from safehaven.core import schema
from safehaven.core.days import haven_today
from safehaven.core.sql import lit, q
from safehaven.core.store import table_exists
from safehaven.intake.contracts import NAME, ContractRegistry, Strict, load_named_yaml, unique_names
from safehaven.publish.disclosure import Policy, ProtectionReport, check_invariants, protect, public_select_sql
from safehaven.publish.disclosure.joint import protect_jointly
from safehaven.publish.disclosure.policy import ROUNDING, THRESHOLD, Rounding
from safehaven.publish.disclosure.relations import Link, Relation
from safehaven.publish.disclosure.report import AuditReport, AuditTable
from safehaven.publish.observed import (
    ObservedError,
    domain_people_sql,
    observed_problem,
    refuse_rare_domain_values,
    refuse_rare_values,
)
from safehaven.publish.sql_gate import (
    COUNTING_MONTHS,
    REPORTING_MONTHS,
    check_output_sql,
    read_only_transaction,
    withholds_run_time_errors,
)

CODES = schema.CODE_LIST
MONTHS = REPORTING_MONTHS
#: The largest grid an output may declare (cells); beyond it the declaration is refused.
MAX_GRID_CELLS = 5_000_000

#: Helpers the output SQL may call (temporary macros of the connection; module docstring, "Helpers").
MACROS = {
    # A code list as a relation (code, display, grp), to LEFT JOIN on its code: one hash join for
    # the whole query. A code not in the list, or NULL, joins no entry: its display and group are NULL.
    "codes": f"(list_name) AS TABLE SELECT code, display, grp FROM {CODES} WHERE list = list_name",
    # Completed years between the week of birth and a date (date_sub counts whole years).
    "age_years": "(born, on_day) AS date_sub('year', born, on_day)",
    # The published age bands, of completed years (defined after age_years, which it calls).
    "age_band": (
        "(born, on_day) AS CASE WHEN age_years(born, on_day) < 18 THEN '0-17' "
        "WHEN age_years(born, on_day) < 45 THEN '18-44' WHEN age_years(born, on_day) < 65 THEN '45-64' "
        "WHEN age_years(born, on_day) < 75 THEN '65-74' WHEN age_years(born, on_day) < 85 THEN '75-84' "
        "ELSE '85+' END"
    ),
    # The sex dimension from a person_gender group (joined from codes('person_gender')): Male,
    # Female, else Not known (codes 0 and 9, a code not in the list, and NULL combined).
    "sex_category": (
        "(gender_group) AS CASE gender_group WHEN 'Male' THEN 'Male' WHEN 'Female' THEN 'Female' ELSE 'Not known' END"
    ),
}


class OutputError(ValueError):
    """An output declaration that cannot be built as written."""


class Domain(Strict):
    """The values a dimension takes in the grid (exactly one kind)."""

    kind: Literal["reporting_months", "observed", "code_list", "values", "sql"]
    code_list: str | None = None
    #: which part of a code list entry the dimension holds
    field: Literal["code", "display", "group"] = "code"
    values: list[str] | None = None
    #: for a code list: the values the SQL gives besides the list's (``Unknown`` for a code not in
    #: it), declared so that they are rows of the grid like the list's (:func:`_domain_sql`)
    also: list[str] = []
    sql: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"kind": data}
        if isinstance(data, dict) and "kind" not in data:
            kinds = [k for k in ("code_list", "values", "sql") if k in data]
            if len(kinds) != 1:
                raise ValueError("a domain is reporting_months, observed, or one of code_list, values, sql")
            return {"kind": kinds[0], **data}
        return data

    @model_validator(mode="after")
    def _complete(self) -> Domain:
        needed = {"code_list": self.code_list, "values": self.values, "sql": self.sql}
        if self.kind in needed and not needed[self.kind]:
            raise ValueError(f"a {self.kind} domain must name its {self.kind}")
        if self.also and self.kind != "code_list":
            raise ValueError("only a code_list domain declares also: values besides its list's")
        return self


class Label(Strict):
    """A label column added after disclosure control, from the dimension's code list."""

    column: str = Field(pattern=NAME)
    code_list: str
    field: Literal["display", "group"] = "display"


class Dimension(Strict):
    """One dimension of an output."""

    name: str = Field(pattern=NAME)
    description: str
    domain: Domain
    label: Label | None = None
    #: why publishing this quasi-identifier (as the contracts classify it) is safe; required
    #: by the publication guard for a coded quasi-identifier such as a practice code.
    quasi_identifier: str | None = None
    #: a resolvable URL for the dimension's codes (CoP 46) when it is not a code list's
    code_system: str | None = Field(default=None, pattern=r"^https?://")


class Measure(Strict):
    """A published number: the count of people, a rate's denominator, or a rate."""

    name: str = Field(pattern=NAME)
    kind: Literal["count", "denominator", "rate"] = "count"
    description: str
    #: for a rate: the denominator measure (the numerator is the count)
    denominator: str | None = None


class PolicySpec(Strict):
    """The output's threshold and rounding (``safehaven.publish.disclosure.Policy``; zeros: :class:`ZerosSpec`).

    An output may suppress more than the haven's floor, never less: counts of 1 to ``THRESHOLD``
    people are suppressed in every output (``safehaven.publish.disclosure.policy``; ISB 1523,
    CoP 34b). Every check reads the threshold from the same definition it
    protects, so a definition below the floor is refused when the definitions load."""

    threshold: int = Field(default=THRESHOLD, ge=THRESHOLD)
    rounding: Rounding = ROUNDING

    @model_validator(mode="before")
    @classmethod
    def _zeros_elsewhere(cls, data: Any) -> Any:
        if isinstance(data, dict) and "suppress_zeros" in data:
            raise ValueError("zeros are stated once, as zeros.publish (the output's zeros policy), not suppress_zeros")
        return data


class StructuralZero(Strict):
    """A combination of dimension values that cannot occur: its cells are not cells of the grid.

    ``match`` maps dimensions to a value or a list of values (compared as text, so a month is
    ``'2026-01-01'``); a grid cell matches when every named dimension holds one of its values.
    """

    match: dict[str, list[str]] = Field(min_length=1)
    #: why no one can be in these cells (e.g. a service the local authority does not provide)
    reason: str = Field(min_length=10)

    @field_validator("match", mode="before")
    @classmethod
    def _as_lists(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in data.items()}

    @field_validator("match")
    @classmethod
    def _values(cls, match: dict[str, list[str]]) -> dict[str, list[str]]:
        if not all(match.values()):
            raise ValueError("a structural zero names at least one value per dimension")
        return match

    def label(self) -> str:
        """The declaration in one line: ``dimension=value|value, ...``."""
        return ", ".join(f"{d}={'|'.join(v)}" for d, v in self.match.items())

    def predicate_sql(self, alias: str = "") -> str:
        """SQL true for the grid cells this declaration removes."""
        prefix = f"{alias}." if alias else ""
        return (
            "("
            + " AND ".join(
                f"CAST({prefix}{q(d)} AS VARCHAR) IN ({', '.join(lit(v) for v in vs)})" for d, vs in self.match.items()
            )
            + ")"
        )


class ZerosSpec(Strict):
    """The output's stated zeros policy (required: an output that does not state it is refused).

    ``publish``: whether sampling zeros (possible cells where no one happened to be) are
    published as 0 (``Policy.suppress_zeros`` is its negation). ``structural``: the impossible
    combinations, which are not cells at all (module docstring, "Zeros"); ``[]`` states there are none.
    """

    publish: bool
    structural: list[StructuralZero]


class LinkageSpec(Strict):
    """The linkage an output makes, and the agreement that must authorise it."""

    agreement: str
    left: str
    right: str
    purpose: str = Field(min_length=10)


class Output(Strict):
    """One anonymised output, as declared in ``data_contracts/outputs/<name>.yaml``."""

    name: str = Field(pattern=NAME)
    version: str
    title: str
    description: str
    purpose: str
    users: list[str] = Field(min_length=1)
    collections: list[str] = Field(min_length=1)
    dimensions: list[Dimension] = Field(min_length=1)
    measures: list[Measure] = Field(min_length=1)
    policy: PolicySpec = PolicySpec()
    #: the zeros policy: sampling zeros published or suppressed, structural zeros declared
    zeros: ZerosSpec
    #: margins for secondary suppression (dimension subsets held fixed); default: every row
    margins: list[list[str]] | None = None
    #: publish total rows summed from published cells (only where the dimension is additive)
    totals: bool = False
    #: notes on coherence with other outputs and sources (quality statement)
    coherence: list[str] = []
    #: days from the end of the reporting period by which the output should be published
    timeliness_target_days: int = Field(default=35, gt=0)
    linkage: LinkageSpec | None = None
    #: relations to other outputs and to the previous publication (``disclosure.relations``)
    relations: list[Relation] = []
    sql: str

    @model_validator(mode="before")
    @classmethod
    def _zeros_stated(cls, data: Any) -> Any:
        """Fail closed: an output that does not state its zeros policy is refused, naming the key."""
        if isinstance(data, dict) and "zeros" not in data:
            raise ValueError("missing key zeros: state the zeros policy (zeros: {publish: true|false, structural: []})")
        return data

    @field_validator("dimensions")
    @classmethod
    def _unique_dims(cls, dims: list[Dimension]) -> list[Dimension]:
        return unique_names(dims, "dimension")

    @model_validator(mode="after")
    def _measures(self) -> Output:
        """One count, first; rates name a denominator; midpoint 6 counts are named ``*_midpoint6``."""
        counts = [m for m in self.measures if m.kind == "count"]
        if len(counts) != 1 or self.measures[0].kind != "count":
            raise ValueError("the first measure, and only it, is the count of people")
        dens = {m.name for m in self.measures if m.kind == "denominator"}
        for m in self.measures:
            if m.kind == "rate" and m.denominator not in dens:
                raise ValueError(f"rate {m.name} needs a denominator measure")
        if self.policy.rounding == "midpoint6":
            counted = [m.name for m in self.measures if m.kind in ("count", "denominator")]
            if not all(name.endswith("_midpoint6") for name in counted):
                raise ValueError("under midpoint 6 rounding, count columns are named *_midpoint6 (OpenSAFELY)")
        return self

    @model_validator(mode="after")
    def _names(self) -> Output:
        """Names all differ; a linkage joins two of the collections; margins name known dimensions."""
        names = {m.name for m in self.measures} | {d.name for d in self.dimensions}
        labels = {d.label.column for d in self.dimensions if d.label}
        if len(names | labels) != len(self.measures) + len(self.dimensions) + len(labels):
            raise ValueError("dimension, label and measure names must all differ")
        if self.linkage and {self.linkage.left, self.linkage.right} - set(self.collections):
            raise ValueError("a linkage joins two of the output's collections")
        dims = {d.name for d in self.dimensions}
        for margin in self.margins or []:
            if set(margin) - dims:
                raise ValueError(f"margin {margin} names unknown dimensions")
        return self

    @model_validator(mode="after")
    def _linkage_declared(self) -> Output:
        """Fail closed: an output reading more than one collection declares the linkage of exactly those
        collections, so that it runs only under the agreement that authorises it (CoP 22, 42b)."""
        if self.reads_several and not self._links_exactly_its_collections():
            raise ValueError(
                f"reads {len(set(self.collections))} collections ({', '.join(sorted(set(self.collections)))}) "
                "without a linkage naming exactly them: add linkage: {agreement, left, right, purpose} for its "
                "two collections (it then runs only under that agreement), or read one collection"
            )
        return self

    def _links_exactly_its_collections(self) -> bool:
        return self.linkage is not None and {self.linkage.left, self.linkage.right} == set(self.collections)

    @model_validator(mode="after")
    def _gated_sql(self) -> Output:
        """The SQL, and every domain's, is one read-only SELECT over the output's haven tables, and the SQL
        counts its count column and every denominator as distinct haven pseudonyms (``sql_gate``)."""
        check_output_sql(self.sql, self.collections, counts=self.people_measures)
        for dim in self.dimensions:
            if dim.domain.sql:
                check_output_sql(dim.domain.sql, self.collections, what=f"the domain of dimension {dim.name}")
        return self

    @model_validator(mode="after")
    def _observed_rows(self) -> Output:
        """An observed dimension is the counted row's own value, never ``pid``, and a domain read from the
        haven is SQL whose values' people can be counted (``safehaven.publish.observed``)."""
        for name in self.observed_dimensions:
            problem = observed_problem(self.sql, name, self.count_col)
            if problem:
                raise ValueError(
                    f"observed dimension {name} {problem}: take it from plain columns of the alias whose pid "
                    f"is counted, declare a code list for it, or remove it"
                )
        for dim in self.dimensions:
            try:
                domain_people_sql(dim.domain.sql or "")
            except ObservedError as exc:
                raise ValueError(f"the domain of dimension {dim.name}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _relations(self) -> Output:
        dims = {d.name for d in self.dimensions}
        for r in self.relations:
            if set(r.match) - dims or (r.time and r.time not in dims):
                raise ValueError(f"a {r.kind} relation names dimensions this output does not have")
        return self

    @model_validator(mode="after")
    def _structural_zeros(self) -> Output:
        dims = {d.name: d for d in self.dimensions}
        for zero in self.zeros.structural:
            if set(zero.match) - set(dims):
                raise ValueError(f"structural zero {zero.label()} names dimensions this output does not have")
            for name, values in zero.match.items():
                domain = dims[name].domain
                unknown = sorted(set(values) - set(domain.values or [])) if domain.kind == "values" else []
                if unknown:
                    raise ValueError(
                        f"structural zero {zero.label()} names {name}={'|'.join(unknown)}, not a value of that "
                        f"dimension ({', '.join(domain.values or [])}): a misspelt declaration removes nothing"
                    )
        return self

    @property
    def disclosure_policy(self) -> Policy:
        """The policy ``disclosure.protect`` applies: threshold, rounding, and zeros from ``zeros.publish``."""
        return Policy(
            threshold=self.policy.threshold, rounding=self.policy.rounding, suppress_zeros=not self.zeros.publish
        )

    @property
    def dimension_names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    @property
    def observed_dimensions(self) -> list[str]:
        """The dimensions whose domain is the values observed in the data."""
        return [d.name for d in self.dimensions if d.domain.kind == "observed"]

    @property
    def reads_several(self) -> bool:
        """Whether the output reads more than one collection (a linkage)."""
        return len(set(self.collections)) > 1

    @property
    def count_col(self) -> str:
        return self.measures[0].name

    @property
    def denominators(self) -> list[str]:
        return [m.name for m in self.measures if m.kind == "denominator"]

    @property
    def people_measures(self) -> list[str]:
        """The measures that count people (the count and the denominators): each is ``count(DISTINCT
        <alias>.pid)`` of a haven table (``sql_gate._refuse_other_count``)."""
        return [self.count_col, *self.denominators]

    @property
    def rate_cols(self) -> dict[str, str]:
        return {m.name: str(m.denominator) for m in self.measures if m.kind == "rate"}

    def definition_sha256(self) -> str:
        """Hash of the declaration as parsed (changes with any change to the output)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def outputs_dir(root: Path) -> Path:
    """``<contracts root>/outputs`` (the root the edge passes in; no default, issue 13)."""
    return root / "outputs"


def load_output(path: Path) -> Output:
    """Load one declaration (``outputs/<name>.yaml``); errors name the file."""
    return load_named_yaml(Output, path, "output", error=OutputError)


def load_outputs(registry: ContractRegistry) -> dict[str, Output]:
    """Every declared output whose collections and code lists the contracts provide."""
    found: dict[str, Output] = {}
    for path in sorted(outputs_dir(registry.root).glob("*.yaml")):
        output = load_output(path)
        missing = set(output.collections) - set(registry.contracts)
        if missing:
            continue  # a haven without that collection does not build the output
        for name in code_lists_of(output):
            registry.code_list(name)
        found[output.name] = output
    return found


def code_lists_of(output: Output) -> list[str]:
    """The code lists an output's domains and labels use."""
    names = [d.domain.code_list for d in output.dimensions if d.domain.code_list]
    names += [d.label.code_list for d in output.dimensions if d.label]
    return sorted(set(n for n in names if n))


CodeRow = tuple[str, str, str | None, str | None, str, str]


def code_list_rows(registry: ContractRegistry) -> list[CodeRow]:
    """(list, code, display, group, system, version) of every code list the contracts and outputs use."""
    names = {f.rule.code_list for c in registry.contracts.values() for f in c.fields if f.rule and f.rule.code_list}
    for path in sorted(outputs_dir(registry.root).glob("*.yaml")):
        names |= set(code_lists_of(load_output(path)))
    rows: list[CodeRow] = []
    for name in sorted(names):
        cl = registry.code_list(name)
        rows += [
            (name, str(c["code"]), _text(c.get("display")), _text(c.get("group")), cl.system, cl.version)
            for c in cl.codes
        ]
    return rows


def _text(value: str | int | None) -> str | None:
    return None if value is None else str(value)


def load_code_lists(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> int:
    """Make the store's copy (``governance.code_list``) hold exactly the code lists in use; rows held.

    Idempotent: when the copy already holds these rows nothing is written (one read), so a
    caller may refresh it at every unit of work; otherwise it is rewritten in one INSERT.
    """
    rows = code_list_rows(registry)
    if table_exists(con, *CODES.split(".")):
        held = con.execute(f"SELECT list, code, display, grp, system, version FROM {CODES}").fetchall()
        if len(held) == len(rows) and set(held) == set(rows):
            return len(rows)
    schema.recreate(con, CODES)
    if rows:
        columns = [list(column) for column in zip(*rows, strict=True)]
        con.execute(f"INSERT INTO {CODES} SELECT {', '.join('unnest(?::VARCHAR[])' for _ in columns)}", columns)
    return len(rows)


# --- reporting period ------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """The reporting period of one output: whole calendar months, ``start`` to ``end``."""

    start: date | None
    end: date | None
    #: per collection: records held in the haven, and those dated after the period end
    records: dict[str, int] = field(default_factory=dict)
    after_end: dict[str, int] = field(default_factory=dict)

    @property
    def months(self) -> int:
        return 0 if self.start is None or self.end is None else months_spanned(self.start, self.end)

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "months": self.months,
            "records_in_haven": dict(self.records),
            "records_after_period_end": dict(self.after_end),
        }


def month_end(day: date) -> date:
    """The last day of ``day``'s calendar month."""
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1) - timedelta(days=1)


def months_spanned(first: date, last: date) -> int:
    """Calendar months from ``first``'s month to ``last``'s, both included (``first`` <= ``last``)."""
    return (last.year - first.year) * 12 + last.month - first.month + 1


def last_complete_month_end(today: date) -> date:
    """The last day of the month before ``today``'s month."""
    return today.replace(day=1) - timedelta(days=1)


def reporting_period(
    con: duckdb.DuckDBPyConnection, output: Output, registry: ContractRegistry, today: date | None = None
) -> Period:
    """First month any collection covers to the last complete month all of them cover."""
    cap = last_complete_month_end(today or haven_today())
    starts, ends, records = [], [], {}
    for name in output.collections:
        contract = registry.contracts[name]
        if not contract.period_field:
            raise OutputError(f"collection {name} has no period_field for a reporting period")
        pf = q(contract.period_field)
        lo, hi, n = con.execute(f"SELECT min({pf}), max({pf}), count(*) FROM haven.{q(name)}").fetchone()
        records[name] = int(n)
        if lo is None:
            return Period(None, None, records, {c: 0 for c in output.collections})
        starts.append(lo.replace(day=1))
        ends.append(min(month_end(hi), cap))
    start, end = min(starts), min(ends)
    if end < start:
        return Period(None, None, records, {c: records[c] for c in output.collections})
    after = {}
    for name in output.collections:
        pf = q(registry.contracts[name].period_field or "")
        after[name] = int(con.execute(f"SELECT count(*) FROM haven.{q(name)} WHERE {pf} > ?", [end]).fetchone()[0])
    return Period(start, end, records, after)


def install_helpers(con: duckdb.DuckDBPyConnection, period: Period) -> None:
    """The ``reporting_months`` table, ``counting_months`` (every month, until ``counting`` narrows it)
    and the helper macros (:data:`MACROS`) the output SQL may use.

    ``codes`` reads ``governance.code_list``, which must exist: :func:`load_code_lists` first.
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE {MONTHS} (month DATE, month_end DATE)")
    if period.start is not None and period.end is not None:
        con.execute(
            f"INSERT INTO {MONTHS} SELECT CAST(m AS DATE), CAST(m + INTERVAL 1 MONTH - INTERVAL 1 DAY AS DATE) "
            "FROM generate_series(CAST(? AS TIMESTAMP), CAST(? AS TIMESTAMP), INTERVAL 1 MONTH) g(m)",
            [period.start, period.end],
        )
    con.execute(f"CREATE OR REPLACE TEMP TABLE {COUNTING_MONTHS} AS SELECT * FROM {MONTHS}")
    for name, body in MACROS.items():
        con.execute(f"CREATE OR REPLACE TEMP MACRO {name}{body}")


# --- building one output ---------------------------------------------------------------


@dataclass(frozen=True)
class StructuralReport:
    """The structural zeros declared and the grid cells they removed (quality statement)."""

    #: per declaration: its ``dimension=value`` label, its reason and the cells it matched
    declared: list[dict[str, Any]] = field(default_factory=list)
    #: grid cells removed (a cell matched by two declarations counts once)
    cells_removed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"declared": [dict(d) for d in self.declared], "cells_removed": self.cells_removed}


@dataclass
class OutputBuild:
    """What building one output did: counts for metadata and the quality statement."""

    name: str
    table: str
    period: Period
    grid_cells: int
    observed_cells: int
    report: ProtectionReport
    violations: list[str]
    agreement: str | None = None
    #: the joint disclosure audit, for an output that declares relations
    audit: AuditReport | None = None
    #: the declared structural zeros and the grid cells they removed
    structural: StructuralReport = field(default_factory=StructuralReport)

    def as_metadata(self) -> dict[str, Any]:
        return {
            "period_start": self.period.start.isoformat() if self.period.start else "none",
            "period_end": self.period.end.isoformat() if self.period.end else "none",
            "grid_cells": self.grid_cells,
            "observed_cells": self.observed_cells,
            "structural_zero_cells": self.structural.cells_removed,
            "violations": len(self.violations),
            **self.report.as_metadata(),
            **(self.audit.as_metadata() if self.audit else {}),
        }


def _domain_sql(dim: Dimension, cells: str) -> str:
    """SQL of the dimension's domain: its values in the grid (module docstring, "The full grid").

    Only an ``observed`` domain reads the cells. A ``code_list`` or ``values`` domain is exactly the
    values it declares (with a code list's ``also``), so a cell the SQL puts outside them refuses the
    build (:func:`_fill_grid`) rather than adding a row label nobody declared: a value the data
    chose (an exact date as text, say) is never published under a declared domain.
    """
    d = q(dim.name)
    dom = dim.domain
    if dom.kind == "reporting_months":
        return f"SELECT month AS {d} FROM {MONTHS}"
    if dom.kind == "observed":
        return f"SELECT DISTINCT {d} FROM {cells}"
    if dom.kind == "sql":
        return f"SELECT DISTINCT v AS {d} FROM ({dom.sql}) s(v)"
    listed = [lit(v) for v in (dom.values if dom.kind == "values" else dom.also) or []]
    declared = [f"SELECT unnest([{', '.join(listed)}])"] if listed else []
    if dom.kind == "code_list":
        col = {"code": "code", "display": "display", "group": "grp"}[dom.field]
        declared.append(f"SELECT {col} FROM codes({lit(str(dom.code_list))}) WHERE {col} IS NOT NULL")
    return f"SELECT DISTINCT v AS {d} FROM ({' UNION ALL '.join(declared)}) s(v)"


def true_cells(
    con: duckdb.DuckDBPyConnection, output: Output, target: str, cells: str
) -> tuple[int, int, StructuralReport]:
    """Temp table ``target``: the counted ``cells`` (``safehaven.publish.counting``) on the full grid
    less its structural zeros. Returns (grid cells, observed cells, structural zeros removed).

    A domain's SQL (gated when it loaded, ``sql_gate``) runs in a ``READ ONLY`` transaction: whatever
    it says, it cannot write the store; only temporary tables are made.
    """
    observed = int(con.execute(f"SELECT count(*) FROM {cells}").fetchone()[0])
    with read_only_transaction(con):
        _refuse_rare_observed(con, output, cells)
        grid = _declared_domains(con, output, cells)
        _fill_grid(con, output, cells, target)
    structural = remove_structural_zeros(con, output, target)
    return grid - structural.cells_removed, observed, structural


def _refuse_rare_observed(con: duckdb.DuckDBPyConnection, output: Output, cells: str) -> None:
    """Refuse an observed dimension value held by the output's threshold of people or fewer over the
    period, and a value of a domain read from the haven held by that few in the rows its SQL reads
    (``safehaven.publish.observed``; the threshold: ``Policy.threshold``). ``counting_months``
    holds the whole period again once counting is done (``counting._run_sql``)."""
    threshold = output.disclosure_policy.threshold
    sql_domains = [d for d in output.dimensions if d.domain.kind == "sql"]
    try:
        if output.observed_dimensions:
            observed = output.observed_dimensions
            refuse_rare_values(con, output.name, output.sql, observed, output.count_col, cells, threshold)
        for dim in sql_domains:
            values = f"({_domain_sql(dim, cells)})"
            refuse_rare_domain_values(con, output.name, dim.name, str(dim.domain.sql), values, threshold)
    except ObservedError as exc:
        raise OutputError(str(exc)) from None


def require_agreement(output: Output, agreement_id: str | None) -> None:
    """Refuse to count a linkage without its authorising agreement (CoP 22, 42b; module docstring).

    Linked: an output that declares a linkage, or reads more than one collection (refused when it
    loads; refused here too, for a declaration that reaches the build some other way).
    """
    if output.linkage is None and output.reads_several:
        raise OutputError(
            f"{output.name} reads {', '.join(sorted(set(output.collections)))} with no linkage declared, so no "
            "agreement authorises joining them: declare its linkage and the agreement that authorises it"
        )
    if output.linkage and agreement_id != output.linkage.agreement:
        raise OutputError(
            f"{output.name} links {output.linkage.left} and {output.linkage.right}: it runs only after "
            f"agreement {output.linkage.agreement} has authorised the linkage"
        )


def count_cells(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    period: Period,
    agreement_id: str | None,
    cells: str,
    counted: str | None = None,
) -> None:
    """Temp table ``cells``: the period's true counts, the stale months counted first (``counting``).
    ``counted``: the fingerprint of the current inputs when the caller has it (else computed here)."""
    from safehaven.publish import counting  # it imports this module

    fingerprint = counted or counting.counting_fingerprint(con, output, period, agreement_id, codes=CODES)
    counting.count_months(con, output, period, fingerprint)
    counting.read_counts(con, output, period, fingerprint, cells)


def remove_structural_zeros(con: duckdb.DuckDBPyConnection, output: Output, table: str) -> StructuralReport:
    """Delete the declared structural-zero cells from the true grid ``table``, in one pass each way.

    A declared structural zero with people in it (a true count or denominator above 0) is refused:
    the declaration or the data is wrong, and dropping the cell would drop people silently.
    """
    zeros = output.zeros.structural
    if not zeros:
        return StructuralReport()
    people = " OR ".join(f"{q(m)} > 0" for m in output.people_measures)
    tallies = [
        f"count(*) FILTER (WHERE {z.predicate_sql()}), count(*) FILTER (WHERE {z.predicate_sql()} AND ({people}))"
        for z in zeros
    ]
    row = con.execute(f"SELECT {', '.join(tallies)} FROM {table}").fetchone()
    assert row is not None
    inhabited = [f"{z.label()} ({row[2 * i + 1]} cell(s))" for i, z in enumerate(zeros) if row[2 * i + 1]]
    if inhabited:
        con.execute(f"DROP TABLE {table}")
        raise OutputError(
            f"{output.name}: declared structural zero(s) with people in them: {'; '.join(inhabited)}; "
            "a structural zero is an impossible combination: correct the declaration or the data"
        )
    _refuse_unknown_values(con, output, table)
    removed = con.execute(f"DELETE FROM {table} WHERE {' OR '.join(z.predicate_sql() for z in zeros)}").fetchone()
    declared = [
        {"match": z.label(), "reason": " ".join(z.reason.split()), "cells_removed": int(row[2 * i])}
        for i, z in enumerate(zeros)
    ]
    return StructuralReport(declared, int(removed[0]) if removed else 0)


#: Domains whose every value is a cell of the grid, so a structural zero's value missing from
#: the grid is a misspelling (a reporting month, an observed value or one an SQL domain reads from
#: the data may simply be absent).
_WHOLE_DOMAINS = ("code_list", "values")


def _refuse_unknown_values(con: duckdb.DuckDBPyConnection, output: Output, table: str) -> None:
    """Refuse a structural zero naming a value its dimension's domain does not have: it would
    remove nothing, and the impossible cells it meant would be treated as sampling zeros."""
    domains = {d.name: d.domain.kind for d in output.dimensions}
    for zero in output.zeros.structural:
        for name, values in zero.match.items():
            if domains[name] not in _WHOLE_DOMAINS:
                continue
            have = {
                str(v) for (v,) in con.execute(f"SELECT DISTINCT CAST({q(name)} AS VARCHAR) FROM {table}").fetchall()
            }
            unknown = sorted(set(values) - have)
            if unknown:
                con.execute(f"DROP TABLE {table}")
                raise OutputError(
                    f"{output.name}: declared structural zero {zero.label()} names {name}={'|'.join(unknown)}, "
                    "which is not in that dimension's domain: correct the declaration (a misspelt one removes nothing)"
                )


def _declared_domains(con: duckdb.DuckDBPyConnection, output: Output, cells: str) -> int:
    """Temp tables ``_dom_<dimension>``; the grid's size, refused beyond :data:`MAX_GRID_CELLS`."""
    grid = 1
    for dim in output.dimensions:
        con.execute(f"CREATE OR REPLACE TEMP TABLE _dom_{dim.name} AS {_domain_sql(dim, cells)}")
        grid *= int(con.execute(f"SELECT count(*) FROM _dom_{dim.name}").fetchone()[0])
    if grid > MAX_GRID_CELLS:
        raise OutputError(f"{output.name}: the grid has {grid:,} cells (limit {MAX_GRID_CELLS:,}); coarsen a dimension")
    return grid


def _fill_grid(con: duckdb.DuckDBPyConnection, output: Output, cells: str, target: str) -> None:
    """Temp table ``target``: every grid cell with its count (0 where none); refuses cells off the grid."""
    dims = [q(d) for d in output.dimension_names]
    joins = " CROSS JOIN ".join(f"_dom_{d.name}" for d in output.dimensions)
    using = ", ".join(dims)
    outside = con.execute(
        f"SELECT count(*) FROM {cells} c ANTI JOIN (SELECT * FROM {joins}) g USING ({using})"
    ).fetchone()[0]
    if outside:
        raise OutputError(
            f"{output.name}: {outside} cell(s) fall outside the declared domains: declare their values "
            "(values:, or a code list's also:) or map them onto declared values in the SQL"
        )
    measures = output.people_measures
    fill = ", ".join(f"CAST(coalesce(c.{q(m)}, 0) AS BIGINT) AS {q(m)}" for m in measures)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {target} AS SELECT {', '.join('g.' + d for d in dims)}, {fill} "
        f"FROM (SELECT * FROM {joins}) g LEFT JOIN {cells} c USING ({using})"
    )
    for dim in output.dimensions:
        con.execute(f"DROP TABLE _dom_{dim.name}")
    con.execute(f"DROP TABLE {cells}")


def _with_labels(con: duckdb.DuckDBPyConnection, output: Output, protected: str) -> str:
    """A copy of the protected table with each dimension's label column after the dimensions."""
    have = [d[0] for d in con.execute(f"SELECT * FROM {protected} LIMIT 0").description]
    dims = output.dimension_names
    cols = [f"p.{q(d)}" for d in dims]
    joins = []
    for i, dim in enumerate(output.dimensions):
        if dim.label:
            part = "display" if dim.label.field == "display" else "grp"
            cols.append(f"_l{i}.{part} AS {q(dim.label.column)}")
            joins.append(f"LEFT JOIN codes({lit(dim.label.code_list)}) _l{i} ON _l{i}.code = p.{q(dim.name)}")
    cols += [f"p.{q(c)}" for c in have if c not in dims]
    labelled = f"{protected}_labelled"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {labelled} AS SELECT {', '.join(cols)} FROM {protected} p {' '.join(joins)}"
    )
    con.execute(f"DROP TABLE {protected}")
    return labelled


def _constrains(others: list[AuditTable], links: list[Link]) -> bool:
    """Whether the related tables can bound a cell: another output, or a revision that only adds.

    A revision that may also remove people puts no bound on a cell or on its change, so it
    cannot change the choice of suppressions (the release's audit still checks it).
    """
    present = {t.key for t in others}
    return any(link.other in present and (link.kind != "revision" or link.added_only) for link in links)


def _protect(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    source: str,
    target: str,
    publication: Mapping[str, Output],
    previous_folder: Path | None,
) -> tuple[ProtectionReport, AuditReport | None]:
    """Protect the true cells: on their own, or jointly with the related published outputs."""
    options: dict[str, Any] = {
        "count_col": output.count_col,
        "margins": output.margins,
        "rate_cols": output.rate_cols or None,
        "policy": output.disclosure_policy,
        "totals": output.totals,
    }
    if not output.relations:
        return protect(con, source, target, output.dimension_names, **options), None
    from safehaven.publish.release_audit import build_context  # it imports this module

    others, links, context = build_context(con, output, publication, previous_folder)
    try:
        if not _constrains(others, links):  # nothing that bounds a cell: the release's audit still runs
            return protect(con, source, target, output.dimension_names, **options), None
        report, audited = protect_jointly(
            con, output.name, source, target, output.dimension_names, others, links, protector=protect, **options
        )
    finally:
        for table in context["previous"].values():
            con.execute(f"DROP TABLE IF EXISTS {table}")
    audited.problems[:0] = context["problems"]
    return report, audited


def table_violations(con: duckdb.DuckDBPyConnection, output: Output) -> list[str]:
    """The disclosure invariants broken by ``published.<output>`` as it stands (empty: none)."""
    return check_invariants(
        con,
        f"published.{output.name}",
        output.dimension_names,
        output.count_col,
        output.disclosure_policy,
        margins=output.margins,
        rate_cols=output.rate_cols or None,
    )


@withholds_run_time_errors("its build (its SQL, its domains' SQL or their results)")
def build_output(
    con: duckdb.DuckDBPyConnection,
    output: Output,
    registry: ContractRegistry,
    *,
    today: date | None = None,
    agreement_id: str | None = None,
    publication: Mapping[str, Output] | None = None,
    previous_folder: Path | None = None,
    period: Period | None = None,
    counted: str | None = None,
) -> OutputBuild:
    """Count, fill the grid, protect and write ``published.<name>`` in public form; check it.

    A linked output runs only with the id of the agreement that authorised its linkage
    (``safehaven.share.linkage.authorise_linkage``, called by the asset first). The code lists are
    the store's copy, which the caller refreshes once per unit of work (:func:`load_code_lists`,
    the aggregate asset); a store without a copy yet (a new store, a test) gets one here.
    An output that declares ``relations`` is protected jointly with the related outputs
    already in ``published`` (``publication``: the declared outputs, default all) and its
    previous publication (files in ``previous_folder``), and audited with them. ``period``:
    the reporting period when the caller has computed it (default: :func:`reporting_period`), and
    ``counted`` the fingerprint of its counts' inputs (``counting.counting_fingerprint``, default
    computed here).
    """
    require_agreement(output, agreement_id)
    if not table_exists(con, *CODES.split(".")):
        load_code_lists(con, registry)
    period = period or reporting_period(con, output, registry, today)
    install_helpers(con, period)
    true_table, protected = f"_true_{output.name}", f"_sdc_{output.name}"
    cells = f"_cells_{output.name}"
    count_cells(con, output, period, agreement_id, cells, counted)
    grid, observed, structural = true_cells(con, output, true_table, cells)
    report, audit_report = _protect(
        con,
        output,
        true_table,
        f"temp.{protected}",
        load_outputs(registry) if publication is None else publication,
        previous_folder,
    )
    con.execute(f"DROP TABLE {true_table}")
    target = f"published.{output.name}"
    labels = [d for d in output.dimensions if d.label]
    if labels:
        protected = _with_labels(con, output, protected)
    con.execute(
        f"CREATE OR REPLACE TABLE {target} AS {public_select_sql(con, protected, order_by=output.dimension_names)}"
    )
    con.execute(f"DROP TABLE {protected}")
    violations = table_violations(con, output)
    if audit_report is not None:
        violations += audit_report.problems
    return OutputBuild(
        output.name, target, period, grid, observed, report, violations, agreement_id, audit_report, structural
    )
