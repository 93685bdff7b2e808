"""The ``safehaven`` command: the nightly run and the governance jobs.

Commands never print identifiable values unless the command exists to do so under a
recorded legal basis (re-identification, subject access), and those are audited.
"""

from __future__ import annotations

import click

from safehaven import __version__
from safehaven.cli import audit, disposal, governance, keys, objections, outputs, release, review, run
from safehaven.cli.common import fail


class HavenGroup(click.Group):
    """The ``safehaven`` group: fails closed while the audit trail does not verify (CoP 23d).

    An audited command is refused before it acts (``safehaven.cli.audit.precheck``), and an
    append that finds the trail broken mid-command is reported in one line, never a traceback.
    """

    def invoke(self, ctx: click.Context) -> object:
        from safehaven.core.audit import AuditTrailBroken
        from safehaven.core.home import HomeError
        from safehaven.core.keys import KeyRingError
        from safehaven.core.store import StoreError, StoreOutOfMemory

        try:
            audit.precheck([*getattr(ctx, "_protected_args", []), *ctx.args])
            return super().invoke(ctx)
        except AuditTrailBroken as exc:
            fail(str(exc), audit.EXIT_REFUSED)
        except HomeError as exc:  # a folder of the home's layout cannot be made: one line, no traceback
            fail(str(exc))
        except KeyRingError as exc:  # a key file refused (unsafe, swapped, missing): says which and how to clear it
            fail(str(exc), audit.EXIT_REFUSED)
        except (StoreError, StoreOutOfMemory) as exc:  # busy, a bad memory limit, out of memory: says what to do
            fail(str(exc))


@click.group(cls=HavenGroup)
@click.version_option(__version__, prog_name="safehaven")
def main() -> None:
    """A health-data safe haven run the way the Code of Practice on Confidential Information asks."""


for _area in (run, keys, objections, governance, audit, outputs, disposal, review, release):
    _area.register(main)


if __name__ == "__main__":  # pragma: no cover
    main()
