"""Sub-commands of the ``safehaven`` CLI, one module per governance area.

Each module defines ``register(main: click.Group) -> None``; ``safehaven.cli.main`` calls them all.
The helpers they share are here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from safehaven.core.home import DEFAULT_HOME, Home
from safehaven.core.keys import Custodian, KeyRing, KeyRingError

if TYPE_CHECKING:
    from safehaven.context import Haven
    from safehaven.intake.contracts import ContractRegistry

#: The haven's home directory (default ``data/`` under the working directory), read here only.
HOME_ENV = "SAFEHAVEN_HOME"
#: Another copy of the contracts to use (default the project's ``data_contracts/``), read here only.
CONTRACTS_ENV = "SAFEHAVEN_CONTRACTS"
#: The key custodian's passphrase for automation and tests, read here (the CLI edge) only.
PASSPHRASE_ENV = "SAFEHAVEN_CUSTODIAN_PASSPHRASE"
#: The write-once audit anchor directory (optional; ``safehaven.core.anchors``), read here only.
AUDIT_WORM_ENV = "SAFEHAVEN_AUDIT_WORM"
#: The haven's objection-register window in whole days (``safehaven.protect.feed``), read here only.
OBJECTIONS_WINDOW_ENV = "SAFEHAVEN_OBJECTIONS_MAX_AGE_DAYS"
#: DuckDB's memory limit for the store (``memory_limit_from_env``)
MEMORY_LIMIT_ENV = "SAFEHAVEN_MEMORY_LIMIT"


def home_root_from_env() -> Path:
    """``$SAFEHAVEN_HOME`` if set, else ``data/`` under the working directory, resolved."""
    return Path(os.environ.get(HOME_ENV, DEFAULT_HOME)).resolve()


def contracts_from_env() -> Path:
    """``$SAFEHAVEN_CONTRACTS`` if set, else the project's ``data_contracts/``."""
    from safehaven.intake.contracts import contracts_dir

    value = os.environ.get(CONTRACTS_ENV)
    return Path(value).resolve() if value else contracts_dir()


def registry_from_env() -> ContractRegistry:
    """The contracts under ``contracts_from_env()``: every command passes this one on."""
    from safehaven.intake.contracts import ContractRegistry

    return ContractRegistry(contracts_from_env())


def audit_worm_from_env() -> Path | None:
    """``$SAFEHAVEN_AUDIT_WORM``: the write-once anchor target (CoP 12, 23d), or None when unset."""
    value = os.environ.get(AUDIT_WORM_ENV, "").strip()
    return Path(value) if value else None


def objections_window_from_env() -> int:
    """``$SAFEHAVEN_OBJECTIONS_MAX_AGE_DAYS``, else 31 (``safehaven.protect.feed.parse_window``).

    A value that is not whole days raises ``ObjectionFeedBlocked``: a mistyped window never
    widens the objection check (CoP 11-14; NDOP: a current list).
    """
    from safehaven.protect import feed

    return feed.parse_window(os.environ.get(OBJECTIONS_WINDOW_ENV, ""), OBJECTIONS_WINDOW_ENV)


def memory_limit_from_env() -> str | None:
    """``$SAFEHAVEN_MEMORY_LIMIT``: DuckDB's memory limit for the store (``"4GB"``); unset or empty:
    the haven's default (``safehaven.core.store.default_memory_limit``)."""
    return os.environ.get(MEMORY_LIMIT_ENV, "").strip() or None


def home_from_env() -> Home:
    """The haven home named by the environment: ``$SAFEHAVEN_HOME`` with its write-once
    anchor target ``$SAFEHAVEN_AUDIT_WORM`` and the store's memory limit ``$SAFEHAVEN_MEMORY_LIMIT``
    (``safehaven.core.home``)."""
    return Home(home_root_from_env(), audit_worm=audit_worm_from_env(), memory_limit=memory_limit_from_env())


def ensure_home() -> Home:
    """The haven home named by the environment (``home_from_env``), created if missing."""
    return home_from_env().ensure()


def haven_from_env(home: Home | None = None, keyring: KeyRing | None = None) -> Haven:
    """The context of a command (``safehaven.context.Haven``): ``home`` (else ``home_from_env``), the
    contracts under ``$SAFEHAVEN_CONTRACTS`` (``registry_from_env``), ``keyring`` (else the home's,
    without a custodian: pass ``custodian_keyring(home)`` for a custodian command), the OS user, today."""
    from safehaven.context import Haven

    home = home or home_from_env()
    return Haven.open(home, contracts=registry_from_env(), keyring=keyring)


#: exit codes, the same for every command: a safeguard or the haven's state refused the request
REFUSED = 1
#: the command was called wrongly (missing or malformed arguments)
USAGE = 2


def fail(message: str, code: int = REFUSED) -> NoReturn:
    """Print ``message`` on standard error and exit with ``code``."""
    click.echo(message, err=True)
    sys.exit(code)


def custodian(*, confirm: bool = False) -> Custodian:
    """The key custodian (NIST SP 800-57 Part 2 roles), asked for the passphrase only when a sealed
    key is first opened or sealed: ``$SAFEHAVEN_CUSTODIAN_PASSPHRASE`` if set, else a hidden prompt
    at a terminal (``confirm``: twice, for a new passphrase). The passphrase is never echoed or logged.
    """

    def ask() -> str:
        value = os.environ.get(PASSPHRASE_ENV)
        if value:
            return value
        if not sys.stdin.isatty():
            raise KeyRingError(
                f"this needs the key custodian's passphrase: run it at a terminal, or set {PASSPHRASE_ENV}"
            )
        return click.prompt("Key custodian passphrase", hide_input=True, confirmation_prompt=confirm)

    return Custodian(ask)


def custodian_keyring(home: Home, *, confirm: bool = False) -> KeyRing:
    """The key ring of a custodian command: it can open the sealed vault private key."""
    return KeyRing(home.keys, custodian(confirm=confirm))
