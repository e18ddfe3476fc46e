"""What watching costs: a Hugging Face ``Trainer`` run with ``CommuteCallback`` against the same run
unwatched, measured in ONE process (issue 22).

A small GPT-2 (1 layer, 32 wide, the shipped tokenizer's vocabulary of 4096), freshly initialised with
one seed, trains on the shipped en/ru data (weights 0.8/0.2, packed ``--seq-len`` blocks) for ``--steps``
steps, four times with the same seed, one after the other:

1. unwatched;
2. watched at the default interval (cost target 1%: the first measurement and the first training steps are
   timed, and the interval is chosen from them; ``commands.watch.interval_for_cost``);
3. watched every 100 steps;
4. unwatched again: the spread between 1 and 4 is the noise floor of this machine.

Reported, for each watched run: the overhead in the run itself (seconds spent inside the callback over the
rest of the run's wall time: the ratio this machine's load least disturbs, since both parts see the same
load), the wall-time ratio ``watched / unwatched - 1`` against the mean of the two unwatched runs (with the
noise floor beside it), the interval the default chose, and whether the weights are bit-identical to the
unwatched run's. ``--steps auto``: twice the interval a probe before the runs predicts (two default
intervals, so three measurements with the one at step 0), between 500 and 4000.

The size of the model does not change the ratio much: one measurement costs about as many training steps
as ``--samples`` sequences are to ``--batch-size`` (per domain and part); what the default interval buys is
measurement time / cost target of training, whatever the model. The model is small so that two default
intervals fit in a few minutes of one CPU core.

Writes ``benchmarks/results/watch.json`` with the environment. Usage:
``python benchmarks/watch.py [--threads 1] [--steps auto] [--samples 12 --blocks 2]``. The default sample
(12 sequences per domain in 2 design blocks, the smallest) keeps the run short: the default interval scales
with it (a 96-sequence sample measures 8x as long, so the default interval is 8x as long and the overhead
the same).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_checkpoints"
WEIGHTS = {"en": 0.8, "ru": 0.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", default="auto")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "watch.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

    from commute_cli.commands.options import AnalyzeOptions
    from commute_cli.commands.watch import DEFAULT_COST, Watcher, interval_for_cost
    from commute_cli.commands.watch_callback import CommuteCallback
    from commute_cli.io.sampling import pack_blocks
    from commute_cli.io.tokenizer import load_tokenizer

    from benchenv import environment

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    tok = load_tokenizer(SAMPLES / "tokenizer")
    sources = {d: str(SAMPLES / "data" / d / "validation.jsonl") for d in WEIGHTS}
    texts = {
        d: [json.loads(x)["text"] for x in (SAMPLES / "data" / d / "train.jsonl").open()] for d in WEIGHTS
    }
    blocks = {d: pack_blocks(t, tok, args.seq_len) for d, t in texts.items()}
    n = min(int(blocks[d].shape[0] / w) for d, w in WEIGHTS.items())
    rows = torch.cat([blocks[d][: int(n * w)] for d, w in WEIGHTS.items()])

    class Mixture(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return rows.shape[0]

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": rows[i], "labels": rows[i]}

    config = GPT2Config(
        vocab_size=len(tok), n_positions=args.seq_len, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)

    def options(folder: Path) -> AnalyzeOptions:
        return AnalyzeOptions(ckpt_dir=folder, samples=args.samples, blocks=args.blocks, batch_size=8)

    def trainer_for(folder: Path, steps: int) -> Trainer:
        targs = TrainingArguments(
            output_dir=str(folder), max_steps=steps, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=50, save_strategy="no",
            report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        return Trainer(
            model=fresh(), args=targs, train_dataset=Mixture(), data_collator=default_data_collator
        )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # probe: one measurement and 30 training steps, for the run length (not for the interval)
        probe = Watcher(sources, tok, WEIGHTS, seq_len=args.seq_len, out=root / "probe", every=1,
                        options=options(root), note=lambda _t: None)  # fmt: skip
        probe.max_steps = 1
        probe.begin(1, model=fresh())
        model = fresh()
        probe.measure(model, 0, 1e-3)  # warm-up (sample drawing)
        t0 = time.perf_counter()
        probe.measure(model, 0, 1e-3)
        probe_measure = time.perf_counter() - t0
        tr = trainer_for(root / "probe-train", 30)
        t0 = time.perf_counter()
        tr.train()
        probe_step = (time.perf_counter() - t0) / 30
        predicted = interval_for_cost(probe_measure, probe_step, DEFAULT_COST)
        steps = min(4000, max(500, 2 * predicted)) if args.steps == "auto" else int(args.steps)
        print(f"probe: measurement {probe_measure:.2f} s, step {probe_step * 1e3:.1f} ms -> interval "
              f"~{predicted}; {steps} steps per run", flush=True)  # fmt: skip

        results: dict[str, Any] = {}
        weights: dict[str, dict[str, torch.Tensor]] = {}
        callbacks: dict[str, CommuteCallback] = {}
        for label, every in (
            ("unwatched", None),
            ("default", "cost"),
            ("every100", 100),
            ("unwatched2", None),
        ):
            tr = trainer_for(root / label, steps)
            if every is not None:
                cb = CommuteCallback(
                    sources, tok, WEIGHTS, seq_len=args.seq_len, out=root / f"watch-{label}",
                    every=None if every == "cost" else int(every), options=options(root / label),
                )  # fmt: skip
                callbacks[label] = cb.attach(tr)
            t0 = time.perf_counter()
            tr.train()
            results[label] = time.perf_counter() - t0
            weights[label] = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
            print(f"{label}: {results[label]:.1f} s", flush=True)

        base = (results["unwatched"] + results["unwatched2"]) / 2
        record: dict[str, Any] = {}
        plain = weights["unwatched"]
        for label in ("default", "every100"):
            w = callbacks[label].watcher
            seconds = [c["seconds"] for c in w.per_step]
            inside = callbacks[label].seconds
            record[label] = {
                "seconds": results[label],
                "callback_seconds": inside,
                "overhead_in_run": inside / (results[label] - inside),
                "overhead_vs_unwatched": results[label] / base - 1.0,
                "every": w.every,
                "measurements": len(seconds),
                "measurement_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
                "measuring_fraction": sum(seconds) / base,
                "bit_identical": all(torch.equal(v, plain[k]) for k, v in weights[label].items()),
            }  # fmt: skip
        noise = abs(results["unwatched2"] / results["unwatched"] - 1.0)
        default = callbacks["default"].watcher
        summary = {
            "benchmark": "watch",
            "what": "HF Trainer + CommuteCallback vs the same run unwatched, one process, same seed",
            "model": "GPT-2, 1 layer, n_embd 32, vocab 4096 (the shipped tokenizer), fresh init",
            "steps": steps,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "samples": args.samples,
            "blocks": args.blocks,
            "cost_target": DEFAULT_COST,
            "default_interval": default.every,
            "default_step_seconds_calibrated": default.step_seconds,
            "probe": {"measurement_s": probe_measure, "step_s": probe_step, "predicted_interval": predicted},
            "unwatched_seconds": [results["unwatched"], results["unwatched2"]],
            "noise_between_unwatched": noise,
            **record,
            "environment": environment(args.threads, load_average=os.getloadavg()),
        }
    print(
        f"overhead at the default interval (every {record['default']['every']} steps, {steps} steps): "
        f"{record['default']['overhead_in_run']:.2%} in the run, "
        f"{record['default']['overhead_vs_unwatched']:+.2%} vs unwatched; every 100 steps: "
        f"{record['every100']['overhead_in_run']:.2%} in the run, "
        f"{record['every100']['overhead_vs_unwatched']:+.2%} vs unwatched; noise between the two unwatched "
        f"runs: {noise:.2%}; bit-identical: "
        f"{record['default']['bit_identical'] and record['every100']['bit_identical']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
