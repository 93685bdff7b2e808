"""What Great Expectations needs set before it is imported: each module of the haven that imports
it (``safehaven.intake.gx_duckdb``, ``safehaven.intake.expectations``) calls :func:`apply` first,
whichever a process imports first (``tests/unit/test_gx_quiet.py`` finds them all).

* ``GX_ANALYTICS_ENABLED=False``: GX reads it at import time.
* GX's log records stop at its top logger. GX logs database errors verbatim, and a DuckDB error
  can quote a value ("Could not convert string '...'"); errors reach the caller through the
  scrubbed result instead. Some GX loggers set their own level (``data_context.types.base`` is
  INFO), so the level of the parent is not enough. To debug GX itself, outside production data,
  set ``logging.getLogger("great_expectations").propagate = True`` after importing
  ``safehaven.intake.gx_duckdb``.
"""

from __future__ import annotations

import logging
import os

#: GX's top logger: its records go no further
GX_LOGGER = "great_expectations"


def apply() -> None:
    """Analytics off and GX's records kept from every handler (module docstring); idempotent."""
    if os.environ.get("GX_ANALYTICS_ENABLED") != "False":  # written once: each module importing GX calls this
        os.environ["GX_ANALYTICS_ENABLED"] = "False"
    logger = logging.getLogger(GX_LOGGER)
    logger.setLevel(logging.CRITICAL)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    logger.propagate = False
