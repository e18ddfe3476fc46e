"""What ``commute validate`` costs on the shipped checkpoint, measured in ONE run (issue 14).

Runs ``commute validate sample_checkpoints/checkpoint-1000 --quick`` in-process (``--no-cache``, threads
pinned with ``torch.set_num_threads``, into a temporary folder) and reports:

- the bare training step that validate times before it starts (what its cost line is computed from);
- the real seconds per training step inside the branches (evaluations included) and its ratio to the bare
  step (how far the announced estimate is from what happened);
- the prediction's time (the nested analysis of the checkpoint);
- the whole run, and the default run estimated from the measured per-step time: the default trains twice
  the steps (two repeats) and predicts from twice the sequences, so
  ``default ~ 2 x training + 2 x prediction + the rest`` (estimated, not run).

Writes ``benchmarks/results/validate_cost.json`` with the environment. Usage:
``python benchmarks/validate_cost.py [--threads 1] [--checkpoint sample_checkpoints/checkpoint-1000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "sample_checkpoints" / "checkpoint-1000")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    from commute_cli.commands import validate as V

    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        opts = V.ValidateOptions(
            checkpoint=args.checkpoint,
            repeats=V.QUICK["repeats"],
            eval_samples=V.QUICK["eval_samples"],
            samples=V.QUICK["samples"],
            blocks=V.QUICK["blocks"],
            out=Path(tmp),
            use_cache=False,
            device="cpu",
            quick=True,
        )
        t0 = time.perf_counter()
        result = V.run_validate(opts, note=notes.append)
        total = time.perf_counter() - t0
    steps = len(V.BRANCHES) * 2 * opts.steps * opts.repeats
    training = sum(r["seconds"] for r in result.repeats)
    bare = float(result.run["seconds_per_step"])
    per_step = training / steps
    rest = total - training
    default_estimate = 2 * training + 2 * rest
    out = {
        "command": f"commute validate {args.checkpoint} --quick (in-process, no cache)",
        "threads": args.threads,
        "training_steps": steps,
        "bare_step_seconds": bare,
        "branch_step_seconds": per_step,
        "branch_step_over_bare_step": per_step / bare,
        "training_seconds": training,
        "prediction_and_setup_seconds": rest,
        "quick_total_seconds": total,
        "default_estimated_seconds": default_estimate,
        "default_over_quick_estimated": default_estimate / total,
        "cost_line": next((n for n in notes if n.startswith("validate:")), None),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    for key, value in out.items():
        if key != "environment":
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    path = REPO / "benchmarks" / "results" / "validate_cost.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
