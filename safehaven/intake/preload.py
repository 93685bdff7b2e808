"""Great Expectations imported beside a landing's insert (issue 22).

Validating a batch imports Great Expectations (``safehaven.intake.gx_duckdb``,
``safehaven.intake.expectations``): about 2 s of Python in each process that validates, paid
before the first batch of the night is checked. A landing's insert is DuckDB's work (the GIL
released) that keeps one core of two busy at most, since it numbers the file's rows in file order
on one thread (6.8M GP records: about 7 s here). :func:`checks_imported_beside` runs the import in
a thread of its own during that insert, so validation finds the modules there. Started earlier,
at the intake step's start, the import held the GIL against the landing's own Python work (the
file's digest, its byte checks) and the step gained nothing (measured here: the landing began
1.6 s later, the validation ended 1.9 s sooner).

The thread never outlives the block: it is waited for at the block's end, however the block
ends. An interrupt is raised once the import has finished (up to 2-3 s later): not waiting for it
was tried, and a process then exiting mid-import aborted (``terminate called without an active
exception``) and a child forked then hung on the import lock (found by review). A failed import
is left for validation's own import to raise and report. What GX needs set before it is
imported (``safehaven.intake.gx_quiet``: an environment variable, its loggers) is set in the
calling thread before the other starts.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from safehaven.intake import gx_quiet

#: the modules validating a batch imports, and with them Great Expectations
CHECK_MODULES = ("safehaven.intake.gx_duckdb", "safehaven.intake.expectations")


@contextmanager
def checks_imported_beside() -> Iterator[None]:
    """Import :data:`CHECK_MODULES` in a thread of its own while the block runs; wait for it at the
    block's end (module docstring). Nothing is started once they are imported."""
    thread = threading.Thread(target=_import_checks, name="safehaven-import-checks", daemon=True)
    if not all(module in sys.modules for module in CHECK_MODULES):
        gx_quiet.apply()  # here, not in the thread: DuckDB may read the environment as it runs
        thread.start()
    try:
        yield
    finally:  # an interrupt too: a process left exiting or forking mid-import aborts or hangs (found by review)
        if thread.ident is not None:
            thread.join()


def _import_checks() -> None:
    for module in CHECK_MODULES:
        try:
            importlib.import_module(module)
        except Exception:  # raised again, and reported, by validation's own import
            return
