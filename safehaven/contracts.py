"""Data contracts: the single written source of truth for what a collection is (CoP 7-9, 45-46).

A contract (``data_contracts/collections/<collection>.yaml``) names the collection's fields,
their types, whether they are required, what they mean, their identifiability class, and the
rule each must meet: a format, an allowed set, or a published code list with the resolvable
URL of its code system (CoP 46). Cross-field rules and a tolerance (the largest share of
invalid rows a batch may carry before it is refused) complete it.

Identifiability classes (confidentiality guide Rule 3; BRIEF "Identifiability levels"):

* ``direct_identifier``: identifies a person on its own (NHS number). Held only in the
  encrypted identity vault once a record enters the haven.
* ``quasi_identifier``: identifies in combination (date of birth, postcode, practice).
  Coarsened (DOB to year, postcode to district) before it may leave.
* ``sensitive``: health or care content (diagnoses, services).
* ``content``: everything else.

Later stages read these classes to decide what may leave the haven. Adding a collection means
adding a contract and a drop folder, with no code change.
"""

from __future__ import annotations

import os
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONTRACTS_DIR = Path(__file__).resolve().parent.parent / "data_contracts"


def contracts_dir() -> Path:
    """``$SAFEHAVEN_CONTRACTS`` if set, else the project's ``data_contracts/``."""
    env = os.environ.get("SAFEHAVEN_CONTRACTS")
    return Path(env).resolve() if env else CONTRACTS_DIR

Identifiability = Literal["direct_identifier", "quasi_identifier", "sensitive", "content"]
FieldType = Literal["VARCHAR", "DATE", "INTEGER", "DOUBLE"]
Format = Literal["nhs_number", "uk_postcode", "ods_code", "gss_code", "date"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Strict):
    """The value rule of one field: exactly one of format, allowed or code_list."""

    format: Format | None = None
    allowed: list[str] | None = None
    code_list: str | None = None
    #: how a value is matched to a code list: whole value, or its first three characters
    #: (ICD-10 four-character codes belong to their three-character category).
    match: Literal["exact", "prefix3"] = "exact"
    min: date | None = None
    #: the latest plausible date; ``today`` means "no future dates".
    max: date | Literal["today"] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        kinds = [k for k in (self.format, self.allowed, self.code_list) if k is not None]
        if len(kinds) > 1:
            raise ValueError("a rule has one of format, allowed or code_list")
        return self


class FieldSpec(_Strict):
    """One field of a collection."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    type: FieldType = "VARCHAR"
    required: bool = True
    description: str
    identifiability: Identifiability
    rule: Rule | None = None


class CrossFieldRule(_Strict):
    """A rule over several fields, written as a SQL predicate over typed values.

    The predicate must be true for a valid row; a row where it is NULL (a field it needs is
    missing) passes here and is caught by that field's own ``required`` rule.
    """

    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    description: str
    #: greater-or-equal pair, compiled to SQL and to a GX column-pair expectation.
    later: str
    earlier: str


class CodeList(_Strict):
    """A published code list (``data_contracts/code_lists/<name>.yaml``)."""

    name: str
    title: str
    system: str = Field(pattern=r"^https?://")
    version: str
    description: str = ""
    codes: list[dict[str, str | int]]

    @property
    def code_values(self) -> list[str]:
        return [str(c["code"]) for c in self.codes]


class Contract(_Strict):
    """A collection's contract, loaded from YAML and checked on load."""

    collection: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    version: str
    owner: str
    description: str
    #: ``content`` collections flow to the haven; ``objections`` feed the objection register.
    kind: Literal["content", "objections"] = "content"
    #: the field holding the patient's NHS number (pseudonymised in the haven).
    patient_key: str = "nhs_number"
    #: the field dating each record, for the reporting period and date coverage.
    period_field: str | None = None
    #: for GP-sourced collections: the field naming the sending practice (type 1 objections).
    practice_field: str | None = None
    tolerance: float = Field(ge=0.0, le=1.0)
    retention_days: int | None = Field(default=None, gt=0)
    fields: list[FieldSpec]
    rules: list[CrossFieldRule] = []

    @field_validator("fields")
    @classmethod
    def _unique(cls, fields: list[FieldSpec]) -> list[FieldSpec]:
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError("field names must be unique")
        return fields

    @model_validator(mode="after")
    def _references(self) -> Contract:
        names = {f.name for f in self.fields}
        for ref in (self.patient_key, self.period_field, self.practice_field):
            if ref is not None and ref not in names:
                raise ValueError(f"{ref!r} is not a field of {self.collection}")
        for rule in self.rules:
            for ref in (rule.later, rule.earlier):
                if ref not in names:
                    raise ValueError(f"rule {rule.id} names unknown field {ref!r}")
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
            if contract.collection != path.stem:
                raise ValueError(f"{path}: collection {contract.collection!r} != file name")
            found[contract.collection] = contract
        for contract in found.values():
            for f in contract.fields:
                if f.rule and f.rule.code_list:
                    self.code_list(f.rule.code_list)
        return found

    def content(self) -> list[Contract]:
        return [c for c in self.contracts.values() if c.kind == "content"]

    def objections(self) -> Contract:
        return next(c for c in self.contracts.values() if c.kind == "objections")

    def code_list(self, name: str) -> CodeList:
        return _load_code_list(self.root / "code_lists" / f"{name}.yaml")


def load_contract(path: Path) -> Contract:
    """Load and check one contract; errors name the file and what is wrong."""
    try:
        return Contract.model_validate(yaml.safe_load(path.read_text()))
    except Exception as exc:
        raise ValueError(f"invalid contract {path.name}: {exc}") from None


def _load_code_list(path: Path) -> CodeList:
    if not path.exists():
        raise ValueError(f"code list {path.stem!r} is missing ({path})")
    return CodeList.model_validate(yaml.safe_load(path.read_text()))
