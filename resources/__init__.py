"""Dagster resources: thin wrappers that hand the domain core its store, keys and contracts."""

from resources.haven import SafeHavenResource

__all__ = ["SafeHavenResource"]
