"""Every CLI refusal is one line with a consistent exit code (1 refused, 2 usage), never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from safehaven.cli.common import REFUSED, USAGE
from safehaven.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
DRAFT = ["agreements", "draft", "my-study", "--recipient", "Some Organisation", "--basis", "consent"]


@pytest.fixture
def contracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home) -> Path:
    """A copy of the project's contracts, named by $SAFEHAVEN_CONTRACTS."""
    root = tmp_path / "contracts"
    shutil.copytree(ROOT / "data_contracts", root)
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root))
    return root


def _one_line_refusal(result, code: int) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_draft_with_a_too_short_title_is_refused_and_writes_nothing(contracts: Path) -> None:
    args = [*DRAFT, "--title", "t", "--level", "pseudonymised", "--field", "gp_events.practice_code"]
    result = CliRunner().invoke(main, args)
    _one_line_refusal(result, REFUSED)
    assert "title" in result.output
    assert not (contracts / "agreements" / "my-study.yaml").exists()


def test_a_draft_naming_an_unknown_field_is_refused_and_writes_nothing(contracts: Path) -> None:
    args = [*DRAFT, "--title", "A study of something", "--level", "pseudonymised", "--field", "gp_events.shoe_size"]
    result = CliRunner().invoke(main, args)
    _one_line_refusal(result, REFUSED)
    assert "gp_events.shoe_size is not in the gp_events contract" in result.output
    assert not (contracts / "agreements" / "my-study.yaml").exists()


def test_a_valid_draft_is_written(contracts: Path) -> None:
    args = [*DRAFT, "--title", "A study of something", "--level", "pseudonymised", "--field", "gp_events.practice_code"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (contracts / "agreements" / "my-study.yaml").is_file()


def test_notify_for_an_unknown_agreement_says_there_is_no_such_agreement(contracts: Path) -> None:
    result = CliRunner().invoke(main, ["objections", "notify", "--agreement", "nope"])
    _one_line_refusal(result, REFUSED)
    assert "no such agreement: nope" in result.output


def test_a_missing_required_option_is_a_usage_error(contracts: Path) -> None:
    result = CliRunner().invoke(main, ["objections", "notify"])
    assert result.exit_code == USAGE and "Traceback" not in result.output


@pytest.mark.parametrize("words", [["run", "--no-demo", "--in-process"], ["audit", "verify"]])
def test_a_key_file_others_can_read_refuses_a_command_in_one_line_saying_how_to_clear_it(home, words) -> None:
    """A refused key file (here the store key, readable by others) stops the command before it
    does anything, in one line naming the file and the fix; it was a traceback (found by review)."""
    from safehaven.core.store import Store

    with Store(home).connect():
        pass
    (home.keys / "store.key").chmod(0o644)
    result = CliRunner().invoke(main, words)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _one_line_refusal(result, REFUSED)
    assert "store.key" in result.output and "chmod" in result.output


def test_a_memory_limit_duckdb_cannot_read_is_one_line_naming_the_variable(
    home, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safehaven.core.store import Store

    with Store(home).connect():  # a haven with a store to verify
        pass
    monkeypatch.setenv("SAFEHAVEN_MEMORY_LIMIT", "4 gigs")
    result = CliRunner().invoke(main, ["audit", "verify"])
    _one_line_refusal(result, REFUSED)
    assert "'4 gigs' is not a size DuckDB reads" in result.output and "$SAFEHAVEN_MEMORY_LIMIT" in result.output
