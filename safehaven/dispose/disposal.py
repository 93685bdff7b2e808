"""Retention and secure disposal: the public names of the ``safehaven.dispose`` package.

The rules (logical disposal first, by destroying keys, then physical, CoP 43d, 43f, 48-50) are
stated in the package docstring (``safehaven/dispose/__init__.py``); each module states its part.
Callers import from here: ``from safehaven.dispose import disposal``.
"""

from __future__ import annotations

from safehaven.core.files import shred_file
from safehaven.core.store import SimulatedCrash
from safehaven.dispose.certificate import certificates, ensure_tables, export_register
from safehaven.dispose.journal import journal_path, pending
from safehaven.dispose.model import (
    EXPORT_STEM,
    JOURNAL,
    METHOD,
    PROGRESS,
    PURPOSE,
    REGISTER,
    RETAINED,
    STEPS,
    DisposalError,
    DisposalPending,
    DisposalResult,
    DueItem,
    Plan,
    SweepReport,
    Target,
)
from safehaven.dispose.planning import make_plan
from safehaven.dispose.run import dispose, resume
from safehaven.dispose.schedule import due, sweep
from safehaven.dispose.steps import Run

__all__ = [
    "EXPORT_STEM",
    "JOURNAL",
    "METHOD",
    "PROGRESS",
    "PURPOSE",
    "REGISTER",
    "RETAINED",
    "STEPS",
    "DisposalError",
    "DisposalPending",
    "DisposalResult",
    "DueItem",
    "Plan",
    "Run",
    "SimulatedCrash",
    "SweepReport",
    "Target",
    "certificates",
    "dispose",
    "due",
    "ensure_tables",
    "export_register",
    "journal_path",
    "make_plan",
    "pending",
    "resume",
    "shred_file",
    "sweep",
]
