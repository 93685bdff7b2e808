"""The partitions of the haven's assets, and why each stage has the partitioning it has.

``docs/architecture.md`` "Partitions" gives the reasoning in full; in short:

* **Intake: one partition per drop** (:func:`drops`, one dynamic partitions definition per
  collection). A drop is one entry of the collection's ``incoming/`` folder as it was received
  (``safehaven.intake.ingest.drop_key``: its shown name and a digest, never a value). Landing
  and validation work drop by drop, so the UI shows which drop landed, was quarantined or was
  refused, and one drop can be run again (a run that failed part-way). The sensor adds a
  collection's new drops and starts one intake run per drop; a run without a partition (the
  in-process runner, ``safehaven run``) lands every drop waiting and records each drop's
  partition. The intake assets are in the collection's own job, ``intake_<collection>``: a
  Dagster job has one partitions definition, and a drop is not a month.
* **Counting: one partition per reporting month** (:data:`REPORTING_MONTHS`). An output's true
  counts are made and kept per month (``safehaven.publish.counting``), so a month can be
  counted, inspected and backfilled alone. The months are the data's, not the calendar's: a
  dynamic partitions definition to which the counting asset adds the months of its reporting
  period, so the UI shows exactly the months the haven reports on.
* **Protection and publication: none.** Suppression is chosen over the whole table and
  jointly with related outputs (CoP 34b), so ``published/<output>`` is built from every month's
  counts at once.
* The nightly job holds the month-partitioned counting assets, so it is a partitioned job:
  launched without a partition (the schedule, the sensor, ``safehaven run``) it counts every
  month whose inputs changed and records a materialisation for each; launched for a month or
  a range (a backfill), it counts those months (and any other stale month, which a protection
  would otherwise refuse to read).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

import dagster as dg

#: the reporting months of the outputs, added by the counting assets as the data reach them
REPORTING_MONTHS = dg.DynamicPartitionsDefinition(name="reporting_months")
#: the name of a collection's drops partitions definition: ``drops_<collection>``
DROPS_PREFIX = "drops_"


def drops(collection: str) -> dg.DynamicPartitionsDefinition:
    """The drops of one collection (module docstring): keys are ``safehaven.intake.ingest.drop_key``."""
    return dg.DynamicPartitionsDefinition(name=f"{DROPS_PREFIX}{collection}")


def drops_of(context: dg.AssetExecutionContext) -> list[str] | None:
    """The drops a run was launched for; None when it was launched without a partition (every drop)."""
    if not (context.has_partition_key or context.has_partition_key_range):
        return None
    return list(context.partition_keys)


def add_drops(instance: dg.DagsterInstance, collection: str, keys: Iterable[str]) -> None:
    """Make ``keys`` partitions of the collection's drops, in the order given (arrival order)."""
    name = drops(collection).name
    have = set(instance.get_dynamic_partitions(name))
    new = [key for key in dict.fromkeys(keys) if key not in have]
    if new:
        instance.add_dynamic_partitions(name, new)


def md_cell(shown: str) -> str:
    """A drop's shown name as a cell of a Markdown table in the UI (its ``|`` escaped)."""
    return shown.replace("|", "\\|")


def month_key(month: date) -> str:
    """A month's partition key: its first day, ISO 8601 (``2026-01-01``)."""
    return month.isoformat()


def months_of(context: dg.AssetExecutionContext) -> list[date] | None:
    """The months a run was launched for; None when it was launched without a partition."""
    if not (context.has_partition_key or context.has_partition_key_range):
        return None
    months = []
    for key in context.partition_keys:
        if not _is_month_key(key):
            raise dg.Failure(
                f"partition {key!r} is not a reporting month (the first day of one, 2026-03-01): months are added "
                "by the counting itself; delete this partition in the UI"
            )
        months.append(date.fromisoformat(key))
    return months


def _is_month_key(key: str) -> bool:
    """Whether ``key`` is a month's partition key (:func:`month_key` of a first day)."""
    try:
        day = date.fromisoformat(key)
    except ValueError:
        return False
    return day.day == 1 and month_key(day) == key


def add_months(instance: dg.DagsterInstance, months: Iterable[date]) -> None:
    """Make the months partitions of :data:`REPORTING_MONTHS`, in calendar order (Dagster resolves a
    range of partitions by their position, so a month earlier than the last re-adds them all sorted;
    materialisations are kept by key, so nothing is lost). The re-adding is not one transaction:
    a range resolved meanwhile fails (it names missing keys), and a process killed meanwhile
    leaves months missing until the next count adds them again; both refuse, neither miscounts."""
    have = instance.get_dynamic_partitions(REPORTING_MONTHS.name)
    new = sorted({month_key(m) for m in months} - set(have))
    if not new:
        return
    months_had = [key for key in have if _is_month_key(key)]  # a stray key added in the UI sorts last
    if months_had and new[0] < max(months_had):  # a range is resolved by position: keep the calendar's order
        for key in have:
            instance.delete_dynamic_partition(REPORTING_MONTHS.name, key)
        new = sorted(set(have) | set(new))
    instance.add_dynamic_partitions(REPORTING_MONTHS.name, new)
