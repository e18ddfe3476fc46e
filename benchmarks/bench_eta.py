"""How honest is analyze's ETA? One real ``commute analyze`` of the shipped run, measured in one run.

The analysis runs with no cache into a temporary folder, with
:class:`commute_cli.render.analysis_progress.AnalysisEta`
fed by the real callbacks. At every event (checkpoint start, block end) the predicted finish time
(``deadline``) is recorded; at the end it is compared with the actual finish: the ratio
``(predicted finish - start) / (actual finish - start)`` at 10%, 25%, 50% and 75% of the events, and how
much the predicted finish moved between consecutive events (a stable ETA moves little), overall and once
the display no longer calls it an upper bound (``ETA ≤``: while only the first checkpoint, with its
one-time warm-up, has been measured).

Usage: ``python benchmarks/bench_eta.py [--threads 1] [--steps 500,1000,1500]``; writes
``benchmarks/results/eta.json`` with the environment (versions, threads, CPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", default=None, help="only these checkpoint steps, e.g. 500,1000,1500")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eta.json")
    args = parser.parse_args()

    import torch
    import transformers

    from commute_cli.commands.analyze import AnalyzeOptions, parse_steps, run_analysis
    from commute_cli.render.analysis_progress import AnalysisEta

    torch.set_num_threads(args.threads)
    events: list[dict] = []
    eta = AnalysisEta(None)

    def record(kind: str) -> None:
        events.append(
            {
                "kind": kind,
                "t": time.monotonic(),
                "deadline": eta.deadline(),
                "per_block": eta.per_block(),
                "overhead": eta.overhead(),
                "upper_bound": eta.upper_bound(),
            }
        )

    def on_checkpoint(index, ref, n_blocks, cached, total=None) -> None:
        eta.total = total
        eta.checkpoint(index, n_blocks, cached)
        record("checkpoint")

    def on_block(_b: int) -> None:
        eta.block()
        record("block")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        run_analysis(
            AnalyzeOptions(
                ckpt_dir=ROOT / "sample_checkpoints",
                out=Path(tmp),
                steps=parse_steps(args.steps),
                use_cache=False,
                device="cpu",
            ),
            on_checkpoint_start=on_checkpoint,
            on_block=on_block,
        )
        t1 = time.monotonic()
    first_t = events[0]["t"]  # the bar appears here (after data preparation)
    actual = t1 - first_t
    known = [e for e in events if e["deadline"] is not None]
    ratios = {}
    for frac in (0.1, 0.25, 0.5, 0.75):
        e = known[min(len(known) - 1, int(frac * len(known)))]
        ratios[f"{int(frac * 100)}%"] = round((e["deadline"] - first_t) / actual, 3)
    moves = [abs(b["deadline"] - a["deadline"]) / actual for a, b in itertools.pairwise(known)]
    exact = [e for e in known if not e["upper_bound"]]  # shown as "ETA m:ss", not "ETA ≤ m:ss"
    moves_exact = [abs(b["deadline"] - a["deadline"]) / actual for a, b in itertools.pairwise(exact)]
    bound_until = round((exact[0]["t"] - first_t) / actual, 3) if exact else None
    result = {
        "what": "analyze's ETA on sample_checkpoints: predicted / actual duration from the first bar",
        "actual_seconds_from_first_bar": round(actual, 2),
        "total_seconds": round(t1 - t0, 2),
        "events": len(events),
        "first_estimate_after_events": events.index(known[0]) + 1 if known else None,
        "predicted_over_actual_at": ratios,
        "median_move_between_events_fraction_of_run": round(statistics.median(moves), 4) if moves else None,
        "max_move_between_events_fraction_of_run": round(max(moves), 4) if moves else None,
        "upper_bound_shown_until_fraction_of_run": bound_until,
        "predicted_over_actual_once_not_a_bound": round((exact[0]["deadline"] - first_t) / actual, 3)
        if exact
        else None,
        "max_move_between_events_once_not_a_bound": round(max(moves_exact), 4) if moves_exact else None,
        "trace": [
            {
                "kind": e["kind"],
                "at": round(e["t"] - first_t, 2),
                "eta": None if e["deadline"] is None else round(e["deadline"] - e["t"], 2),
                "per_block": None if e["per_block"] is None else round(e["per_block"], 3),
                "overhead": round(e["overhead"], 3),
                "upper_bound": e["upper_bound"],
            }
            for e in events
        ],
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump({k: v for k, v in result.items() if k != "trace"}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
