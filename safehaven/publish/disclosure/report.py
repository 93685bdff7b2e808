"""What the disclosure audit reads and reports (``safehaven.publish.disclosure.audit``).

Kept apart from the audit itself so the modules that only name these (the outputs, the
code location's definitions) do not import numpy and scipy, which only an audit needs
(issue 22: an idle run's processes import what they use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from safehaven.publish.disclosure.policy import DEFAULT_POLICY, Policy

__all__ = ["AuditReport", "AuditTable"]


@dataclass(frozen=True)
class AuditTable:
    """One published table as the audit reads it: ``count_col`` NULL where suppressed."""

    key: str
    relation: str
    dimensions: tuple[str, ...]
    count_col: str = "people"
    policy: Policy = DEFAULT_POLICY
    #: every cell unknown (``[0, inf)``) and audited: which cells of a table being built the
    #: rest of the publication already pins to 0 or a small count
    unknown: bool = False
    #: its suppressed cells are audited (a previous publication is evidence, not audited itself)
    audited: bool = True


@dataclass
class AuditReport:
    """What the audit did and found: counts, widths, iterations and time only."""

    cells_audited: int = 0
    changes_audited: int = 0
    in_relations: int = 0
    rows: int = 0
    blocks: int = 0
    lp_solves: int = 0
    upper_unbounded: int = 0
    #: the smallest upper bound found for a suppressed cell or change in relations (a batch's
    #: proof counts as the threshold + 1; a change proven able to fall below minus the threshold
    #: has no upper bound found and is left out); None when there is none
    narrowest_upper: int | None = None
    seconds: float = 0.0
    iterations: int = 1
    #: cells the joint protection's fallback suppressed in the failing blocks (0: not applied)
    fallback_block_suppression: int = 0
    problems: list[str] = field(default_factory=list)
    #: per table key: local cell ids (row order by dimensions) failing, and their published neighbours
    failing: dict[str, set[int]] = field(default_factory=dict)
    neighbours: dict[str, set[int]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_metadata(self) -> dict[str, Any]:
        return {
            "audit_cells": self.cells_audited,
            "audit_changes": self.changes_audited,
            "audit_in_relations": self.in_relations,
            "audit_blocks": self.blocks,
            "audit_lp_solves": self.lp_solves,
            "audit_upper_unbounded": self.upper_unbounded,
            "audit_narrowest_upper": -1 if self.narrowest_upper is None else self.narrowest_upper,
            "audit_failing": sum(len(v) for v in self.failing.values()),
            "audit_iterations": self.iterations,
            "audit_fallback_block_suppression": self.fallback_block_suppression,
            "audit_seconds": round(self.seconds, 3),
        }
