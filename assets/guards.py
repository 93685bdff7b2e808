"""Refusals shared by the steps after intake, as Dagster failures (the rules are the domain's)."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from safehaven.intake.validation import CollectionHeld


@contextmanager
def held_fails() -> Iterator[None]:
    """A step refused because a collection it reads is held (``safehaven.intake.validation.refuse_held``)
    fails with the reason and its remedy only, no traceback: it is the haven's decision, not a fault."""
    try:
        yield
    except CollectionHeld as exc:
        raise dg.Failure(str(exc)) from None
