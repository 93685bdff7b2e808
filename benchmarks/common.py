"""Small helpers shared by the harness and its worker processes."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

#: Pipeline stages in run order: the Dagster asset groups, and the baseline's stages.
STAGES: tuple[str, ...] = (
    "ingest",
    "validate",
    "objections",
    "pseudonymise",
    "aggregate",
    "publish",
    "release",
)

#: Collections in the synthetic drop (content collections first, then objections).
CONTENT = ("gp_events", "hospital_episodes", "social_care")
COLLECTIONS = (*CONTENT, "objections")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Clock:
    """Named laps: ``with clock("stage"): ...``; wall and process CPU seconds accumulate per name.

    CPU seconds (all threads of the process) are far less disturbed than wall seconds when other
    work shares the machine, so the harness reports both.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._name: str | None = None
        self._start = 0.0
        self._cpu = 0.0

    def __call__(self, name: str) -> Clock:
        self._name = name
        return self

    def __enter__(self) -> Clock:
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._name is not None
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start
        self.cpu_seconds[self._name] = self.cpu_seconds.get(self._name, 0.0) + time.process_time() - self._cpu
        self._name = None


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str))
    tmp.replace(path)
