"""Worker: run the nightly job through Dagster, in process, and time every step.

Run by ``benchmarks.run`` in its own subprocess, so that the peak memory it reports
(``ru_maxrss``) is the pipeline's own::

    python -m benchmarks.pipeline --home DIR --out result.json [--threads N]

``DIR/incoming/`` must hold the drop. The job runs on an ephemeral Dagster instance (nothing is
written to ``$DAGSTER_HOME``). Per-step seconds come from the run's STEP_START and
STEP_SUCCESS/STEP_FAILURE event timestamps; each step is put in the ``group_name`` of the
asset(s) it materialised (or checked). Rows come from the assets' ``rows_in``/``rows_out``
metadata. A sampling thread records the resident set size every 100 ms so the report can
say which stage holds the peak; ``ru_maxrss`` is the exact peak.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import bisect  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

from benchmarks.common import peak_rss_bytes, write_json  # noqa: E402


class RssSampler(threading.Thread):
    """Samples this process's RSS and CPU seconds (wall-clock timestamp, bytes, seconds)."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.cpu: list[tuple[float, float]] = []
        self._stop_event = threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        while not self._stop_event.is_set():
            now = time.time()
            self.samples.append((now, self._proc.memory_info().rss))
            self.cpu.append((now, time.process_time()))
            self._stop_event.wait(self.interval)

    def cpu_at(self, t: float) -> float:
        """Process CPU seconds at wall time ``t``, interpolated between samples."""
        i = bisect.bisect_left(self.cpu, (t, -1.0))
        if i <= 0:
            return self.cpu[0][1] if self.cpu else 0.0
        if i >= len(self.cpu):
            return self.cpu[-1][1]
        (t0, c0), (t1, c1) = self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


class TracedConnection:
    """A store connection that times every ``execute``/``executemany`` (``--trace-sql``).

    Only for profiling runs: it adds a Python call per statement. Statements are recorded with
    their wall-clock start (to place them in a step), wall and CPU seconds and their text,
    whitespace collapsed and cut to 300 characters (SQL text, never bound parameters).
    """

    def __init__(self, con: Any, sink: list[tuple[float, str, float, float]]) -> None:
        self._con = con
        self._sink = sink

    def _timed(self, method: str, query: Any, *args: Any, **kwargs: Any) -> Any:
        began, wall, cpu = time.time(), time.perf_counter(), time.process_time()
        try:
            return getattr(self._con, method)(query, *args, **kwargs)
        finally:
            text = " ".join(str(query).split())[:300]
            self._sink.append((began, text, time.perf_counter() - wall, time.process_time() - cpu))

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        return self._timed("execute", query, *args, **kwargs)

    def executemany(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        return self._timed("executemany", query, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)

    def __enter__(self) -> TracedConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._con.close()


def install_trace(sink: list[tuple[float, str, float, float]]) -> None:
    """Make ``Store.connect`` hand out traced connections (in this process only)."""
    from contextlib import contextmanager

    import safehaven.core.store as store

    original = store.Store.connect

    @contextmanager
    def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        with original(self, *args, **kwargs) as con:
            yield TracedConnection(con, sink)

    store.Store.connect = connect  # type: ignore[method-assign]


def summarise_trace(
    trace: list[tuple[float, str, float, float]], steps: list[dict[str, Any]], top: int = 40
) -> dict[str, Any]:
    """The statements that took longest (summed per step and text), and each step's SQL total.

    A step's time outside its statements is Python (hashing, encryption, Dagster) or waiting.
    """
    spans = [(s["started"], s["started"] + s["seconds"], s["step"]) for s in steps]
    totals: dict[tuple[str, str], list[float]] = {}
    per_step: dict[str, list[float]] = {}
    for began, text, wall, cpu in trace:
        step = next((name for lo, hi, name in spans if lo <= began <= hi), "-")
        for agg in (totals.setdefault((step, text), [0.0, 0.0, 0]), per_step.setdefault(step, [0.0, 0.0, 0])):
            agg[0] += wall
            agg[1] += cpu
            agg[2] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "statements": [
            {"step": step, "sql": text, "seconds": w, "cpu_seconds": c, "calls": int(n)}
            for (step, text), (w, c, n) in ranked
        ],
        "steps": {
            step: {"sql_seconds": w, "sql_cpu_seconds": c, "statements": int(n)} for step, (w, c, n) in per_step.items()
        },
    }


def _vault_pair(home: Path) -> None:
    """The identity vault's key pair, as a custodian sets a haven up; the benchmark never reads the
    vault, so the private half is sealed under a random passphrase nobody keeps."""
    import secrets

    from safehaven.core.home import Home
    from safehaven.core.keys import VAULT, Custodian, KeyRing

    keyring = KeyRing(Home(home).ensure().keys, Custodian.of(secrets.token_urlsafe(32)))
    if not keyring.recorded(VAULT):
        keyring.create_keypair(VAULT)


def run(home: Path, threads: int | None, trace_sql: bool = False) -> dict[str, Any]:
    os.environ["SAFEHAVEN_HOME"] = str(home)
    _vault_pair(home)
    import dagster as dg

    trace: list[tuple[float, str, float, float]] = []
    if trace_sql:
        install_trace(trace)

    from assets.definitions import build_definitions

    imported = time.perf_counter()
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    group_of = {key: graph.get(key).group_name for key in graph.get_all_asset_keys()}
    job = defs.resolve_job_def("nightly")
    instance = dg.DagsterInstance.ephemeral()
    run_config = {"resources": {"haven": {"config": {"threads": threads}}}} if threads else None
    built = time.perf_counter()

    sampler = RssSampler()
    sampler.start()
    began, cpu_began = time.perf_counter(), time.process_time()
    result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=run_config)
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    wall_end = time.time()
    sampler.stop()

    starts: dict[str, float] = {}
    ends: dict[str, tuple[float, str]] = {}
    step_assets: dict[str, set[str]] = defaultdict(set)
    step_groups: dict[str, set[str]] = defaultdict(set)
    assets: dict[str, dict[str, Any]] = {}
    checks_failed: list[str] = []
    for record in instance.all_logs(result.run_id):
        event = record.dagster_event
        if event is None:
            continue
        kind = event.event_type_value
        step = event.step_key
        if kind == "STEP_START" and step:
            starts[step] = record.timestamp
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and step:
            ends[step] = (record.timestamp, kind)
        elif kind == "ASSET_MATERIALIZATION" and step:
            mat = event.event_specific_data.materialization  # type: ignore[union-attr]
            key = mat.asset_key
            step_assets[step].add(key.to_user_string())
            step_groups[step].add(group_of.get(key) or "default")
            meta = {
                k: v.value
                for k, v in mat.metadata.items()
                if isinstance(v.value, (int, float, str, dict, list)) and not isinstance(v.value, bool)
            }
            assets[key.to_user_string()] = {
                "step": step,
                "group": group_of.get(key) or "default",
                "rows_in": meta.get("rows_in"),
                "rows_out": meta.get("rows_out"),
                "metadata": meta,
            }
        elif kind == "ASSET_CHECK_EVALUATION" and step:
            evaluation = event.event_specific_data  # type: ignore[assignment]
            key = evaluation.asset_key  # type: ignore[union-attr]
            step_groups[step].add(group_of.get(key) or "default")
            if not evaluation.passed:  # type: ignore[union-attr]
                checks_failed.append(f"{key.to_user_string()}:{evaluation.check_name}")  # type: ignore[union-attr]

    steps: list[dict[str, Any]] = []
    for step, start in sorted(starts.items(), key=lambda kv: kv[1]):
        end, status = ends.get(step, (wall_end, "STEP_INCOMPLETE"))
        groups = sorted(step_groups.get(step, set()))
        if not groups:  # a step that failed before materialising: group from its asset key
            groups = sorted({g for k, g in group_of.items() if k.to_python_identifier() == step}) or ["default"]
        steps.append(
            {
                "step": step,
                "started": start,
                "group": groups[0] if len(groups) == 1 else "+".join(groups),
                "assets": sorted(step_assets.get(step, set())),
                "seconds": end - start,
                "cpu_seconds": sampler.cpu_at(end) - sampler.cpu_at(start),
                "status": status,
                "peak_rss_sampled": sampler.peak_between(start, end),
            }
        )
    import assets.definitions

    summary = summarise_trace(trace, steps) if trace_sql else None
    for step in steps if summary else []:
        in_sql = summary["steps"].get(step["step"], {})
        step["sql_seconds"] = in_sql.get("sql_seconds", 0.0)
        step["sql_statements"] = in_sql.get("statements", 0)
    return {
        "code": str(Path(assets.definitions.__file__).parents[1]),
        "sql_trace": summary,
        "success": bool(result.success),
        "checks_failed": checks_failed,
        "seconds_import": imported - _T0,
        "seconds_build_definitions": built - imported,
        "seconds_job": wall,
        "cpu_seconds_job": cpu,
        "seconds_steps_total": sum(s["seconds"] for s in steps),
        "steps": steps,
        "assets": assets,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_sampled": max((r for _, r in sampler.samples), default=0),
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--trace-sql", action="store_true", help="time every store statement (profiling)")
    args = parser.parse_args(argv)
    doc = run(args.home.resolve(), args.threads or None, args.trace_sql)
    write_json(args.out, doc)
    return 0 if doc["success"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
