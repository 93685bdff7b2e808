"""A received file refused whole at ingest: the rule it broke, why, and what clears it.

Its own module so that the modules of ingest's rules (``safehaven.intake.ingest``,
``safehaven.intake.control``) raise one kind of refusal; ``safehaven.intake.ingest`` re-exports it.
"""

from __future__ import annotations


class FileRejected(Exception):
    """A file cannot be read as its collection; ``rule`` and ``reason`` say why."""

    def __init__(self, rule: str, reason: str, action: str, details: dict | None = None):
        super().__init__(reason)
        self.rule, self.reason, self.action, self.details = rule, reason, action, details or {}
