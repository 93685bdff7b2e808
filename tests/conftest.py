"""Shared fixtures: every test gets its own haven home, store and Dagster instance."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, Custodian, KeyRing
from safehaven.core.store import Store

#: The key custodian's passphrase in tests (given to CLI commands through the environment).
TEST_PASSPHRASE = "correct horse battery staple (tests)"
#: A cheaper scrypt work factor for keys sealed in tests; production seals with keys.SCRYPT_N
#: (the factor is stored in each sealed file, so opening is unchanged).
TEST_SCRYPT_N = 2**14


def test_custodian(passphrase: str = TEST_PASSPHRASE) -> Custodian:
    """The key custodian of a test haven."""
    return Custodian.of(passphrase, scrypt_n=TEST_SCRYPT_N)


test_custodian.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def custodian_ring(home: Home) -> KeyRing:
    """The key ring of the custodian's commands (opens the sealed vault key)."""
    return KeyRing(home.keys, test_custodian())


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    """An empty haven home in a temporary directory, set as $SAFEHAVEN_HOME, with the identity
    vault's key pair the custodian created (sealed under ``TEST_PASSPHRASE``, which CLI commands
    read from $SAFEHAVEN_CUSTODIAN_PASSPHRASE)."""
    root = tmp_path / "haven"
    monkeypatch.setenv("SAFEHAVEN_HOME", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
    home = Home(root).ensure()
    # set up as a custodian sets up a haven: the vault pair, its private half sealed
    KeyRing(home.keys, test_custodian()).create_keypair(VAULT)
    return home


@pytest.fixture
def store(home: Home) -> Store:
    return Store(home)


def scan_for(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    """Every file under ``root`` that holds any needle in its plain bytes (path -> needles)."""
    hits: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found = [n.decode() for n in needles if n in data]
            if found:
                hits[str(path)] = found
    return hits


NHS_LIKE = re.compile(rb"999[ -]?\d{3}[ -]?\d{4}")


def seeded_nhs_numbers(incoming: Path) -> set[str]:
    """Canonical NHS numbers in every generated drop under ``incoming`` (read with DuckDB)."""
    found: set[str] = set()
    for path in incoming.rglob("*.csv"):
        rows = duckdb.execute(
            "SELECT DISTINCT regexp_replace(nhs_number, '[^0-9]', '', 'g') FROM read_csv(?, all_varchar=true)",
            [str(path)],
        ).fetchall()
        found |= {r[0] for r in rows if r[0]}
    return found


def leaked_nhs_numbers(roots: list[Path], seeded: set[str]) -> dict[str, int]:
    """Files under ``roots`` holding any seeded NHS number in plain bytes, in any formatting."""
    hits: dict[str, int] = {}
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            numbers = {re.sub(rb"[^0-9]", b"", m).decode() for m in NHS_LIKE.findall(data)}
            leaked = numbers & seeded
            if leaked:
                hits[str(path)] = len(leaked)
    return hits


@pytest.fixture
def dagster_instance(tmp_path: Path):
    """A Dagster instance whose event storage lives under the test's own directory."""
    import dagster as dg

    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        yield instance
