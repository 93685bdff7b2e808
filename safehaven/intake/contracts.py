"""Data contracts: the single written source of truth for what a collection is (CoP 7-9, 45-46).

A contract (``data_contracts/collections/<collection>.yaml``) names the collection's fields,
their types, whether they are required, what they mean, their identifiability class, and the
rule each must meet: a format, an allowed set, or a published code list with the resolvable
URL of its code system (CoP 46). Cross-field rules, optional uniqueness declarations, a
tolerance and a retention period complete it.

Identifiability classes (confidentiality guide Rule 3; ``docs/rules.md`` "Identifiability levels"):

* ``direct_identifier``: identifies a person on its own (NHS number). Held only in the
  encrypted identity vault once a record enters the haven.
* ``quasi_identifier``: identifies in combination (date of birth, postcode, practice).
  Coarsened (DOB to year, postcode to district) before it may leave.
* ``sensitive``: health or care content (diagnoses, services).
* ``content``: everything else.

Later stages read these classes to decide what may leave the haven.

Rules, each with a stable identifier that the row-level quarantine, the Great Expectations
suite and the quality measures all use (``safehaven.intake.rules``):

* ``<field>.required``: a required field has a value (empty text counts as missing);
* ``<field>.type``: a value given for a DATE, INTEGER or DOUBLE field parses as one
  (dates as ISO 8601 ``YYYY-MM-DD``);
* ``<field>.<format>``, ``<field>.code_list``, ``<field>.allowed``: the field's value rule.
  Formats: ``nhs_number`` (ten digits with the mod-11 check digit, NHS Data Dictionary),
  ``uk_postcode``, ``ods_code`` (NHS Organisation Data Service), ``gss_code`` (ONS GSS
  geography) and ``date``;
* ``<field>.range``: a date between ``min`` and ``max`` (``today``: no future dates);
* ``<id>`` of a cross-field rule: ``later`` is not before ``earlier`` (discharge not before
  admission, event not before birth);
* ``<id>`` of a uniqueness declaration: no two rows of a batch share the key.

A missing value fails only its field's ``required`` rule (and only if the field is
required); every other rule passes on NULL, so each failure has one cause.

``control: manifest`` makes each data file wait for its sender's control file and land only
when the control file's row count (and SHA-256, if given) agrees with it
(``safehaven.intake.control``); the default ``none`` expects none.

``tolerance`` is the largest share of a batch that may break the contract: of its rows (a row
that breaks any rule is invalid) and of the values checked by any one rule. A batch over it is
refused whole. Adding a collection means adding a contract and a drop folder, with no code
change.
"""

from __future__ import annotations

import re
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safehaven.core import yamlio

CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "data_contracts"


def contracts_dir() -> Path:
    """The project's ``data_contracts/``: the contracts root where the caller names none.

    No environment is read here: the edges name another root (``$SAFEHAVEN_CONTRACTS``, read by
    ``safehaven.cli.common.contracts_from_env`` for the CLI and the Dagster resource) and pass it
    in, as ``ContractRegistry(root)`` or a ``root`` argument.
    """
    return CONTRACTS_DIR


Identifiability = Literal["direct_identifier", "quasi_identifier", "sensitive", "content"]
FieldType = Literal["VARCHAR", "DATE", "INTEGER", "DOUBLE"]
Format = Literal["nhs_number", "uk_postcode", "ods_code", "gss_code", "date"]

#: Where each format is published (CoP 46: codes and formats with a resolvable URL).
FORMAT_STANDARDS: dict[str, str] = {
    "nhs_number": "https://www.datadictionary.nhs.uk/attributes/nhs_number.html",
    "uk_postcode": "https://www.datadictionary.nhs.uk/attributes/postcode_of_usual_address.html",
    "ods_code": "https://digital.nhs.uk/services/organisation-data-service",
    "gss_code": "https://geoportal.statistics.gov.uk/",
    "date": "https://www.iso.org/iso-8601-date-and-time-format.html",
}

#: A declared name (collection, field, rule, code list, output, dimension, column): a plain
#: lower-case SQL identifier, so it can be used in SQL and file names as it stands.
NAME = r"^[a-z][a-z0-9_]{0,62}$"
_VERSION = r"^[0-9]+\.[0-9]+\.[0-9]+$"


class Strict(BaseModel):
    """A declaration read from YAML: unknown keys are refused and a loaded one never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)
M = TypeVar("M", bound=BaseModel)


def unique_names(items: list[N], what: str) -> list[N]:
    """Rule: the ``what``s of one declaration (fields, dimensions) have distinct names."""
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names must be unique")
    return items


class Rule(Strict):
    """The value rule of one field: at most one of format, allowed or code_list, plus a range."""

    format: Format | None = None
    allowed: list[str] | None = Field(default=None, min_length=1)
    code_list: str | None = Field(default=None, pattern=NAME)
    #: how a value is matched to a code list: whole value, or its first three characters
    #: (ICD-10 four-character codes belong to their three-character category).
    match: Literal["exact", "prefix3"] = "exact"
    min: date | None = None
    #: the latest plausible date; ``today`` means "no future dates".
    max: date | Literal["today"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        kinds = [k for k in (self.format, self.allowed, self.code_list) if k is not None]
        if len(kinds) > 1:
            raise ValueError("a rule has one of format, allowed or code_list")
        if self.match != "exact" and self.allowed is None and self.code_list is None:
            raise ValueError("match applies to an allowed set or a code list")
        if (self.min is not None or self.max is not None) and self.format != "date":
            raise ValueError("min and max apply to format: date")
        if isinstance(self.min, date) and isinstance(self.max, date) and self.min > self.max:
            raise ValueError("min is after max")
        return self


#: a field named for a date of birth (``date_of_birth``, ``birth_date``, ``dob``)
_BIRTH = re.compile(r"(^|_)(birth|dob)(_|$)", re.IGNORECASE)
_AT_LEAST_QUASI = ("direct_identifier", "quasi_identifier")


#: names a field cannot have: DuckDB's row id, which a landing numbers rows by
#: (``safehaven.intake.ingest.insert_numbered``): a column of that name would hide it
RESERVED_FIELD_NAMES = ("rowid",)


class FieldSpec(Strict):
    """One field of a collection."""

    name: str = Field(pattern=NAME)
    type: FieldType = "VARCHAR"
    required: bool = True
    description: str = Field(min_length=1)
    identifiability: Identifiability
    rule: Rule | None = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_FIELD_NAMES:
            raise ValueError(f"field {name}: the name is DuckDB's row id, which the landing table needs; rename it")
        return name

    @model_validator(mode="after")
    def _rule_fits_type(self) -> FieldSpec:
        fmt = self.rule.format if self.rule else None
        if fmt == "date" and self.type != "DATE":
            raise ValueError(f"field {self.name}: format date needs type DATE")
        if fmt not in (None, "date") and self.type != "VARCHAR":
            raise ValueError(f"field {self.name}: format {fmt} needs type VARCHAR")
        if self.rule and (self.rule.allowed or self.rule.code_list) and self.type != "VARCHAR":
            raise ValueError(f"field {self.name}: allowed sets and code lists hold text (type VARCHAR)")
        return self

    @model_validator(mode="after")
    def _identifiers_declared_as_such(self) -> FieldSpec:
        """What identifies a person cannot be declared as something else: the haven keeps a field as
        its class says (a direct identifier only in the vault, a date of birth only to its week), so
        a mislabelled one reached the haven whole (found by review; confidentiality guide Rule 3).
        An NHS number is a direct identifier; a date of birth a quasi-identifier at least; a text
        field other than a direct identifier has a value rule, since free text can carry one."""
        fmt = self.rule.format if self.rule else None
        if fmt == "nhs_number" and self.identifiability != "direct_identifier":
            raise ValueError(f"field {self.name}: an NHS number (format nhs_number) is a direct_identifier")
        if self.type == "DATE" and _BIRTH.search(self.name) and self.identifiability not in _AT_LEAST_QUASI:
            raise ValueError(f"field {self.name}: a date of birth is a quasi_identifier (the haven keeps its week)")
        if self.type == "VARCHAR" and self.rule is None and self.identifiability != "direct_identifier":
            raise ValueError(
                f"field {self.name}: a text field needs a value rule (a format, an allowed set or a code list): "
                "free text can carry an identifier into the haven"
            )
        return self


class CrossFieldRule(Strict):
    """A rule over two fields: ``later`` is not before ``earlier`` (a valid row has later >= earlier).

    A row where either is missing passes here; a missing required value is caught by that
    field's own ``required`` rule.
    """

    id: str = Field(pattern=NAME)
    description: str = Field(min_length=1)
    later: str
    earlier: str


class UniqueKey(Strict):
    """A uniqueness declaration: no two rows of one batch share these fields' values.

    The first row (in file order) of each key is kept; every later row with the same key
    fails rule ``id``. Rows with a missing key field are not compared.
    """

    id: str = Field(pattern=NAME)
    description: str = Field(min_length=1)
    fields: list[str] = Field(min_length=1)


class CodeList(Strict):
    """A published code list (``data_contracts/code_lists/<name>.yaml``)."""

    name: str = Field(pattern=NAME)
    title: str
    system: str = Field(pattern=r"^https?://")
    version: str
    description: str = ""
    codes: list[dict[str, str | int]] = Field(min_length=1)

    @field_validator("codes")
    @classmethod
    def _codes(cls, codes: list[dict[str, str | int]]) -> list[dict[str, str | int]]:
        values = [str(c.get("code", "")) for c in codes]
        if any(not v.strip() for v in values):
            raise ValueError("every entry needs a non-empty code")
        if len(set(values)) != len(values):
            raise ValueError("codes must be unique")
        return codes

    @property
    def code_values(self) -> list[str]:
        return [str(c["code"]) for c in self.codes]


class Contract(Strict):
    """A collection's contract, loaded from YAML and checked on load."""

    collection: str = Field(pattern=NAME)
    version: str = Field(pattern=_VERSION)
    owner: str = Field(min_length=1)
    description: str = Field(min_length=1)
    #: ``content`` collections flow to the haven; ``objections`` feed the objection register.
    kind: Literal["content", "objections"] = "content"
    #: the field holding the patient's NHS number (pseudonymised in the haven).
    patient_key: str = "nhs_number"
    #: the field dating each record, for the reporting period and date coverage.
    period_field: str | None = None
    #: for GP-sourced collections: the field naming the sending practice (type 1 objections).
    practice_field: str | None = None
    #: the largest share of a batch's rows (and of any one rule's checked values) that may be
    #: invalid before the batch is refused whole.
    tolerance: float = Field(ge=0.0, le=1.0)
    #: days the haven keeps the collection's records before disposal (CoP 43d, 48-50).
    retention_days: int | None = Field(default=None, gt=0)
    #: ``manifest``: each data file comes with its sender's control file (``<file>.ctl.json``: its
    #: row count, optionally its SHA-256), and lands only when it agrees (a file cut short at a row
    #: boundary is refused; ``safehaven.intake.control``); ``none``: no control file is expected.
    control: Literal["none", "manifest"] = "none"
    fields: list[FieldSpec] = Field(min_length=1)
    rules: list[CrossFieldRule] = []
    unique: list[UniqueKey] = []

    @field_validator("fields")
    @classmethod
    def _unique_fields(cls, fields: list[FieldSpec]) -> list[FieldSpec]:
        return unique_names(fields, "field")

    @property
    def store_tables(self) -> tuple[str, ...]:
        """The store tables (``zone.name``) that hold this collection's records: as landed, valid and
        rejected (``safehaven.intake``), and pseudonymised (``safehaven.protect.haven``; none for objections)."""
        c = self.collection
        return (f"landing.{c}", f"landing.{c}_valid", f"landing.{c}_rejected", f"haven.{c}")

    @model_validator(mode="after")
    def _references(self) -> Contract:
        """The patient key, period and practice fields are fields; the key is an NHS number; the period a DATE."""
        by_name = {f.name: f for f in self.fields}
        for ref in (self.patient_key, self.period_field, self.practice_field):
            if ref is not None and ref not in by_name:
                raise ValueError(f"{ref!r} is not a field of {self.collection}")
        key = by_name[self.patient_key]
        if not (key.rule and key.rule.format == "nhs_number") or key.identifiability != "direct_identifier":
            raise ValueError(f"patient_key {key.name!r} must be a direct_identifier with format nhs_number")
        if self.period_field and by_name[self.period_field].type != "DATE":
            raise ValueError(f"period_field {self.period_field!r} must be a DATE field")
        return self

    @model_validator(mode="after")
    def _rule_references(self) -> Contract:
        """Cross-field rules compare two known fields of one comparable type; unique keys name known fields."""
        by_name = {f.name: f for f in self.fields}
        for rule in self.rules:
            for ref in (rule.later, rule.earlier):
                if ref not in by_name:
                    raise ValueError(f"rule {rule.id} names unknown field {ref!r}")
            if by_name[rule.later].type != by_name[rule.earlier].type or by_name[rule.later].type == "VARCHAR":
                raise ValueError(f"rule {rule.id} compares fields of one DATE, INTEGER or DOUBLE type")
        for key_decl in self.unique:
            unknown = [f for f in key_decl.fields if f not in by_name]
            if unknown:
                raise ValueError(f"uniqueness {key_decl.id} names unknown field(s) {unknown}")
        ids = [r.id for r in self.rules] + [u.id for u in self.unique]
        if len(set(ids)) != len(ids):
            raise ValueError("cross-field rule and uniqueness ids must be unique")
        return self

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> FieldSpec:
        return next(f for f in self.fields if f.name == name)

    def fields_of(self, *classes: Identifiability) -> list[FieldSpec]:
        return [f for f in self.fields if f.identifiability in classes]


class ContractRegistry:
    """All contracts and code lists under one ``data_contracts`` directory."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or contracts_dir()

    @cached_property
    def contracts(self) -> dict[str, Contract]:
        found: dict[str, Contract] = {}
        for path in sorted((self.root / "collections").glob("*.yaml")):
            contract = load_contract(path)
            found[contract.collection] = contract
        for contract in found.values():
            for f in contract.fields:
                if f.rule and f.rule.code_list:
                    self.code_list(f.rule.code_list)
        if sum(c.kind == "objections" for c in found.values()) > 1:
            raise ValueError("more than one contract of kind objections")
        return found

    def content(self) -> list[Contract]:
        return [c for c in self.contracts.values() if c.kind == "content"]

    def objections(self) -> Contract:
        return next(c for c in self.contracts.values() if c.kind == "objections")

    def code_list(self, name: str) -> CodeList:
        return load_named_yaml(CodeList, self.root / "code_lists" / f"{name}.yaml", "code list")


def validation_summary(exc: ValidationError) -> str:
    """A validation error as one line: ``where: problem`` per error, without the input echoed."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def load_named_yaml(
    model: type[M], path: Path, kind: str, *, key: str = "name", error: type[Exception] = ValueError
) -> M:
    """One declaration file (``<name>.yaml``) checked as ``model``; errors name the file.

    Rules: the file exists; its YAML is a valid ``model``; the declaration's ``key`` (its
    name) is the file's name, so the name that other declarations use finds the file.
    """
    if not path.exists():
        raise error(f"{kind} {path.stem!r} is missing ({path})")
    try:
        declared = model.model_validate(yamlio.safe_load(path.read_text()))
    except ValidationError as exc:
        raise error(f"invalid {kind} {path.name}: {validation_summary(exc)}") from None
    except Exception as exc:
        raise error(f"invalid {kind} {path.name}: {exc}") from None
    name = getattr(declared, key)
    if name != path.stem:
        raise error(f"{kind} {path.name}: {key} {name!r} != file name")
    return declared


def load_contract(path: Path) -> Contract:
    """Load and check one contract (``collections/<collection>.yaml``); errors name the file."""
    return load_named_yaml(Contract, path, "contract", key="collection")
