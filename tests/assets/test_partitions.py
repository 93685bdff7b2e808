"""The reporting-month partitions of the counting assets (``assets.partitions``): months only, in
calendar order, so a range of partitions is the months between its ends."""

from __future__ import annotations

from datetime import date

import dagster as dg
import pytest

from assets import counts, partitions
from resources.haven import SafeHavenResource
from safehaven.core.home import Home
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.outputs import load_outputs


def test_months_stay_in_calendar_order_when_an_earlier_month_arrives() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        partitions.add_months(instance, [date(2026, 3, 1), date(2026, 4, 1)])
        partitions.add_months(instance, [date(2026, 4, 1), date(2026, 1, 1)])
        assert instance.get_dynamic_partitions(partitions.REPORTING_MONTHS.name) == [
            "2026-01-01",
            "2026-03-01",
            "2026-04-01",
        ]


@pytest.mark.parametrize("key", ["2026-03-15", "x", "2026-3-01"])
def test_a_partition_that_is_not_a_reporting_month_fails_the_count_naming_it(home: Home, key: str) -> None:
    asset = counts.counts_asset(load_outputs(ContractRegistry())["gp_activity"])
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(partitions.REPORTING_MONTHS.name, [key])
        result = dg.materialize(
            [asset],
            instance=instance,
            partition_key=key,
            resources={"haven": SafeHavenResource()},
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert f"partition {key!r} is not a reporting month" in str(failure.step_failure_data.user_failure_data.description)
