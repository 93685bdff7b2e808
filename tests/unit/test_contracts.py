"""Contracts: the shipped ones are complete, and a contract that is wrong is refused with a reason."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from safehaven.intake.contracts import CONTRACTS_DIR, FORMAT_STANDARDS, Contract, ContractRegistry, contracts_dir

REGISTRY = ContractRegistry(CONTRACTS_DIR)


def test_every_shipped_contract_is_complete() -> None:
    assert set(REGISTRY.contracts) == {"gp_events", "hospital_episodes", "social_care", "objections"}
    for contract in REGISTRY.contracts.values():
        assert contract.version and contract.owner and contract.description
        assert 0 <= contract.tolerance <= 1
        assert contract.period_field is not None
        key = contract.field(contract.patient_key)
        assert key.identifiability == "direct_identifier"
        for spec in contract.fields:
            assert spec.description.strip(), spec.name
            assert spec.rule is not None, f"{contract.collection}.{spec.name} has no rule"
        if contract.kind == "content":
            assert contract.retention_days and contract.retention_days > 0
    assert REGISTRY.objections().collection == "objections"
    assert {c.collection for c in REGISTRY.content()} == {"gp_events", "hospital_episodes", "social_care"}


def test_code_lists_and_formats_cite_a_resolvable_url() -> None:
    """CoP 46: codes are published with resolvable http URLs to their code system."""
    for contract in REGISTRY.contracts.values():
        for spec in contract.fields:
            assert spec.rule is not None
            if spec.rule.code_list:
                code_list = REGISTRY.code_list(spec.rule.code_list)
                assert code_list.system.startswith(("http://", "https://"))
                assert code_list.version and code_list.code_values
            if spec.rule.format:
                standard = FORMAT_STANDARDS.get(spec.rule.format)
                assert standard is not None and standard.startswith("https://")
    assert set(FORMAT_STANDARDS) == {"nhs_number", "uk_postcode", "ods_code", "gss_code", "date"}


def test_identifiability_classes_are_readable_by_later_stages() -> None:
    gp = REGISTRY.contracts["gp_events"]
    assert [f.name for f in gp.fields_of("direct_identifier")] == ["nhs_number"]
    assert {f.name for f in gp.fields_of("quasi_identifier")} == {"practice_code", "date_of_birth", "sex", "postcode"}
    assert [f.name for f in gp.fields_of("sensitive")] == ["diagnosis_code"]


def _base() -> dict[str, Any]:
    return yaml.safe_load((CONTRACTS_DIR / "collections" / "social_care.yaml").read_text())


def _field(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in doc["fields"] if f["name"] == name)


Breakage = Callable[[dict[str, Any]], None]


def _set_field(name: str, key: str, value: Any) -> Breakage:
    """A breakage that sets ``key`` of field ``name`` to (a copy of) ``value``."""

    def apply(doc: dict[str, Any]) -> None:
        _field(doc, name)[key] = copy.deepcopy(value)

    return apply


def _set_top(key: str, value: Any) -> Breakage:
    """A breakage that sets top-level ``key`` to (a copy of) ``value``."""

    def apply(doc: dict[str, Any]) -> None:
        doc[key] = copy.deepcopy(value)

    return apply


def _update_first_rule(**changes: str) -> Breakage:
    """A breakage that changes the first cross-field rule."""

    def apply(doc: dict[str, Any]) -> None:
        doc["rules"][0].update(changes)

    return apply


def _duplicate_field(doc: dict[str, Any]) -> None:
    """List the ``sex`` field twice."""
    doc["fields"].append(dict(_field(doc, "sex")))


def _duplicate_rule_id(doc: dict[str, Any]) -> None:
    """A uniqueness rule reusing the first cross-field rule's id."""
    doc["unique"] = [{"id": doc["rules"][0]["id"], "description": "x", "fields": ["nhs_number"]}]


#: each wrong change, applied to the social care contract
BREAKAGES: dict[str, Breakage] = {
    "two rule kinds": _set_field("sex", "rule", {"code_list": "person_gender", "allowed": ["1"]}),
    "range on text": _set_field("sex", "rule", {"code_list": "person_gender", "min": "2000-01-01"}),
    "date format on text": _set_field("sex", "rule", {"format": "date"}),
    "postcode format on a date": _set_field("start_date", "rule", {"format": "uk_postcode"}),
    "min after max": _set_field("start_date", "rule", {"format": "date", "min": "2020-01-01", "max": "2010-01-01"}),
    "unknown identifiability": _set_field("sex", "identifiability", "secret"),
    "no description": _set_field("sex", "description", ""),
    "duplicate field": _duplicate_field,
    "hostile field name": _set_field("sex", "name", 'sex"; DROP TABLE x; --'),
    "patient key not an NHS number": _set_top("patient_key", "sex"),
    "period field not a date": _set_top("period_field", "postcode"),
    "cross-field rule on an unknown field": _update_first_rule(later="nope"),
    "cross-field rule on text": _update_first_rule(later="postcode", earlier="sex"),
    "uniqueness on an unknown field": _set_top(
        "unique", [{"id": "one_service", "description": "x", "fields": ["nope"]}]
    ),
    "duplicate rule ids": _duplicate_rule_id,
    "tolerance over 1": _set_top("tolerance", 1.5),
    "version not semantic": _set_top("version", "latest"),
    "unknown key": _set_top("owners", "someone"),
    "non-positive retention": _set_top("retention_days", 0),
    "empty allowed set": _set_field("sex", "rule", {"allowed": []}),
    "prefix match without a list": _set_field("postcode", "rule", {"format": "uk_postcode", "match": "prefix3"}),
}


def _broken(change: str) -> dict[str, Any]:
    doc = _base()
    if change not in BREAKAGES:  # pragma: no cover
        raise AssertionError(change)
    BREAKAGES[change](doc)
    return doc


@pytest.mark.parametrize(
    "change",
    [
        "two rule kinds",
        "range on text",
        "date format on text",
        "postcode format on a date",
        "min after max",
        "unknown identifiability",
        "no description",
        "duplicate field",
        "hostile field name",
        "patient key not an NHS number",
        "period field not a date",
        "cross-field rule on an unknown field",
        "cross-field rule on text",
        "uniqueness on an unknown field",
        "duplicate rule ids",
        "tolerance over 1",
        "version not semantic",
        "unknown key",
        "non-positive retention",
        "empty allowed set",
        "prefix match without a list",
    ],
)
def test_a_wrong_contract_is_refused(change: str) -> None:
    assert Contract.model_validate(_base())  # the base is fine
    with pytest.raises(ValueError):
        Contract.model_validate(_broken(change))


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "data_contracts"
    shutil.copytree(CONTRACTS_DIR, root)
    return root


def test_registry_errors_name_the_file(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "collections" / "social_care.yaml").write_text(yaml.safe_dump(_broken("duplicate field")))
    with pytest.raises(ValueError, match="social_care.yaml"):
        _ = ContractRegistry(root).contracts


def test_file_name_must_match_the_collection(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    shutil.copy(root / "collections" / "social_care.yaml", root / "collections" / "care.yaml")
    with pytest.raises(ValueError, match="file name"):
        _ = ContractRegistry(root).contracts


@pytest.mark.parametrize("problem", ["missing", "duplicate codes", "no url", "wrong name"])
def test_a_code_list_must_exist_and_be_well_formed(tmp_path: Path, problem: str) -> None:
    root = _copy(tmp_path)
    path = root / "code_lists" / "person_gender.yaml"
    doc = yaml.safe_load(path.read_text())
    if problem == "missing":
        path.unlink()
    else:
        if problem == "duplicate codes":
            doc["codes"].append(dict(doc["codes"][0]))
        elif problem == "no url":
            doc["system"] = "NHS Data Dictionary"
        else:
            doc["name"] = "gender"
        path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="person_gender"):
        _ = ContractRegistry(root).contracts


def test_contracts_directory_from_the_environment_is_read_at_the_edges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resources.haven import SafeHavenResource
    from safehaven.cli.common import contracts_from_env, registry_from_env

    root = _copy(tmp_path)
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root))
    assert contracts_from_env() == root.resolve()
    assert registry_from_env().root == root.resolve() == SafeHavenResource().registry().root
    assert ContractRegistry().root == contracts_dir() == CONTRACTS_DIR  # the domain reads no environment
    assert ContractRegistry(root).root == root
    monkeypatch.delenv("SAFEHAVEN_CONTRACTS")
    assert contracts_from_env() == CONTRACTS_DIR == SafeHavenResource().registry().root


def test_uniqueness_declaration_loads() -> None:
    doc = _base()
    doc["unique"] = [
        {
            "id": "one_service_start",
            "description": "one row per person, service and start",
            "fields": ["nhs_number", "service_type", "start_date"],
        }
    ]
    contract = Contract.model_validate(doc)
    assert contract.unique[0].fields == ["nhs_number", "service_type", "start_date"]


@pytest.mark.parametrize(
    ("field", "words"),
    [
        ({"name": "carer_nhs_number", "type": "VARCHAR", "description": "the carer's NHS number",
          "identifiability": "content", "rule": {"format": "nhs_number"}}, "is a direct_identifier"),
        ({"name": "birth_date", "type": "DATE", "description": "when the person was born",
          "identifiability": "sensitive", "rule": {"format": "date"}}, "a date of birth is a quasi_identifier"),
        ({"name": "notes", "type": "VARCHAR", "description": "free text typed by a clinician",
          "identifiability": "content"}, "free text can carry an identifier"),
    ],
    ids=["a second NHS number as content", "a date of birth as sensitive", "free text"],
)  # fmt: skip
def test_a_field_that_identifies_cannot_be_declared_as_something_else(field: dict[str, Any], words: str) -> None:
    """The haven keeps a field as its class says: a second NHS number declared content, a date of
    birth declared sensitive, or free text (which can hold an NHS number) reached the haven whole
    (found by review). Refused when the contract loads."""
    doc = _base()
    doc["fields"].append(field)
    with pytest.raises(ValueError, match=words):
        Contract.model_validate(doc)
