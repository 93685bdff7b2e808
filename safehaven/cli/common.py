"""Sub-commands of the ``safehaven`` CLI, one module per governance area.

Each module defines ``register(main: click.Group) -> None``; ``safehaven.cli.main`` calls them all.
The helpers they share are here.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from safehaven.core.home import Home


def ensure_home() -> Home:
    """The haven home named by the environment, created if missing."""
    return Home.from_env().ensure()


#: exit codes, the same for every command: a safeguard or the haven's state refused the request
REFUSED = 1
#: the command was called wrongly (missing or malformed arguments)
USAGE = 2


def fail(message: str, code: int = REFUSED) -> NoReturn:
    """Print ``message`` on standard error and exit with ``code``."""
    click.echo(message, err=True)
    sys.exit(code)
