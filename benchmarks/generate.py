"""Worker: generate a synthetic drop with ``safehaven.tools.synthetic.generate`` and write its row counts.

Run by ``benchmarks.run`` from the harness's snapshot of the code, so the drop comes from the
same generator version as the pipeline that reads it::

    python -m benchmarks.generate --out DIR --patients N --seed S --counts counts.json [--period-end YYYY-MM-DD]
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

from benchmarks.common import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--counts", type=Path, required=True)
    parser.add_argument(
        "--period-end", type=date.fromisoformat, default=None, help="last day of the period (default: last month's)"
    )
    args = parser.parse_args(argv)
    from safehaven.tools.synthetic import generate

    began = time.perf_counter()
    counts = generate(args.out, args.patients, args.seed, period_end=args.period_end)
    write_json(args.counts, {"rows": counts, "seconds": time.perf_counter() - began})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
