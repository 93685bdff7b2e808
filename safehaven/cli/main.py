"""The ``safehaven`` command: the nightly run and the governance jobs.

Commands never print identifiable values unless the command exists to do so under a
recorded legal basis (re-identification, subject access), and those are audited.
"""

from __future__ import annotations

import click

from safehaven import __version__
from safehaven.cli import disposal, governance, keys, objections, outputs, review, run


@click.group()
@click.version_option(__version__, prog_name="safehaven")
def main() -> None:
    """A health-data safe haven run the way the Code of Practice on Confidential Information asks."""


for _area in (run, keys, objections, governance, outputs, disposal, review):
    _area.register(main)


if __name__ == "__main__":  # pragma: no cover
    main()
