"""Relations between outputs that a reader can use to narrow a suppressed cell.

Rule: an intruder reads the whole publication, not one table. Where two outputs count the
same people, a published value of one bounds the cells of the other, and secondary
suppression chosen table by table can be undone (Hundepool et al., *Statistical Disclosure
Control*, Wiley 2012, section 4.2: "linked tables" must be protected jointly; ISB 1523
requires the risk of the *publication* to be assessed). So every such relation is declared
in the output definition (``relations:`` in ``data_contracts/outputs/<name>.yaml``), and the
disclosure audit (:mod:`safehaven.publish.disclosure.audit`) adds it to its linear program:

* ``subset``: every person counted in a cell of this output is counted in one of the cells of
  output ``of`` that match it on the dimensions ``match`` (this -> other), within ``window``
  months of this cell's ``time`` dimension. So ``this[c] <= sum of those cells``. Example:
  a social care service that starts within 14 days of a discharge in month M is in use in
  month M or M+1, so ``discharge_to_social_care[M, provider, LA, service] <=
  social_care_users[M, LA, service] + social_care_users[M+1, LA, service]``.
* ``same_population``: this output and ``of`` count the same people by different
  breakdowns, each person in exactly one cell of each group sharing the dimensions ``match``:
  the two groups' sums are equal.
* ``revision``: the previous publication of the same output and months. With
  ``added_only`` (a month is re-published only with more data: people are added, never
  removed) every cell is at least its previous true count; the change of a cell suppressed
  in either publication is audited as a count of people itself.

A relation must be *true* of the counts: the audit's linear program then contains the true
table, and a program with no solution means a declaration is wrong (the audit fails closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PREVIOUS", "Link", "Relation", "RelationKind", "links_of"]

RelationKind = Literal["subset", "same_population", "revision"]
#: Suffix of the audit key of an output's previous publication.
PREVIOUS = "@previous"


class Relation(BaseModel):
    """One declared relation of an output to another output (or to its previous publication)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: RelationKind
    #: the other output (``subset``, ``same_population``); a revision relates an output to itself
    of: str | None = None
    #: this output's dimension -> the other output's dimension, matched by equal value
    #: (``match``, not ``on``: YAML 1.1 reads a bare ``on`` key as true)
    match: dict[str, str] = {}
    #: the dimension of this output (a month) the window is counted from, and the other's
    time: str | None = None
    other_time: str | None = None
    #: months of the other output, from this cell's month: (first, last) offsets
    window: tuple[int, int] = (0, 0)
    #: revision: counts only grow between publications of a month
    added_only: bool = False
    why: str = Field(min_length=10)

    @model_validator(mode="after")
    def _complete(self) -> Relation:
        if self.kind == "revision" and self.of is not None:
            raise ValueError("a revision relates an output to its own previous publication: no 'of'")
        if self.kind != "revision" and not self.of:
            raise ValueError(f"a {self.kind} relation names the other output ('of')")
        if self.window[0] > self.window[1]:
            raise ValueError("a window is (first, last) month offsets, first <= last")
        if self.window != (0, 0) and not self.time:
            raise ValueError("a window needs the time dimension it counts from ('time')")
        return self


@dataclass(frozen=True)
class Link:
    """A relation resolved between two audit keys (outputs, or ``<name>@previous``)."""

    kind: RelationKind
    this: str
    other: str
    on: tuple[tuple[str, str], ...]
    time: tuple[str, str] | None = None
    window: tuple[int, int] = (0, 0)
    added_only: bool = False


def links_of(name: str, dimensions: list[str], relations: list[Relation], *, previous: bool = False) -> list[Link]:
    """The links of output ``name`` (and, with ``previous``, among the previous publications)."""
    out: list[Link] = []
    for r in relations:
        if r.kind == "revision":
            if previous:
                on = tuple((d, d) for d in dimensions)
                out.append(Link("revision", name, name + PREVIOUS, on, added_only=r.added_only))
            continue
        time = (r.time, r.other_time or r.time) if r.time else None
        link = Link(r.kind, name, str(r.of), tuple(r.match.items()), time, r.window)
        out.append(link)
        if previous:
            out.append(Link(r.kind, name + PREVIOUS, str(r.of) + PREVIOUS, link.on, time, r.window))
    return out
