"""Cost of loading a Megatron-LM checkpoint (all ranks merged) against the same weights saved by transformers.

``commute`` reads a Megatron ``iter_N`` folder by unpickling every rank's ``model_optim_rng.pt``
(``weights_only`` with ``argparse.Namespace`` allowed), merging the tensor- and pipeline-parallel shards into
one GPT-2 state dict and loading it into ``GPT2LMHeadModel`` (``commute_cli.io.megatron``). This script
measures what that costs against ``load_model`` of the same weights as a ``save_pretrained`` folder
(safetensors). Everything is measured in ONE run of this script:

- a GPT-2-small-shaped model (``--layers`` x ``--width``, 12 heads, vocabulary 50304 padded as Megatron pads
  it) with random weights is saved twice in a temporary folder: by ``save_pretrained`` (float32 safetensors)
  and in Megatron-LM's layout (``megatron.core`` names, bf16 as Megatron trains, ``--tp`` x ``--pp``
  ranks, QKV rows per head, column/row-parallel splits, ``args``, numpy RNG state);
- each measurement is a fresh process (``--child``), pinned to one thread, that imports everything, resets
  its peak resident set, calls ``checkpoints.load_model`` on one of the two folders and reports the wall
  time of that call and the peak resident set (``VmHWM``) above the post-import baseline;
- the two folders are loaded interleaved, ``--repeats`` times (median taken); the first Megatron child also
  checks that its logits equal the transformers copy's (bf16 weights on both sides).

Printed and written to ``benchmarks/results/bench_megatron_load.json`` (with the environment): the
Megatron / safetensors ratios of time and peak memory.

Usage: ``python benchmarks/bench_megatron_load.py [--repeats 3] [--layers 12] [--width 768] [--tp 4]
[--pp 2]`` (about 2 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import environment

ROOT = Path(__file__).resolve().parent.parent
VOCAB, HEADS, SEQ = 50304, 12, 1024


def proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(folder: str, check: str | None) -> dict:
    """``load_model`` of one folder: wall time and peak memory of that call alone."""
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401 (imported before the baseline, as analyze has it)

    from commute_cli.io import checkpoints

    Path("/proc/self/clear_refs").write_text("5")
    base = proc_kib("VmRSS")
    start = time.perf_counter()
    model = checkpoints.load_model(Path(folder))
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "peak_mib_above_baseline": (proc_kib("VmHWM") - base) / 1024}
    if check:
        ids = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(0))
        other = checkpoints.load_model(Path(check))
        with torch.no_grad():
            out["max_abs_logit_diff"] = float(
                (model(input_ids=ids).logits - other(input_ids=ids).logits).abs().max()
            )
    return out


def write(root: Path, layers: int, width: int, tp: int, pp: int) -> tuple[Path, Path]:
    """The same random GPT-2 as a save_pretrained folder and as a Megatron-LM iter folder."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=width, n_layer=layers, n_head=HEADS,
                        activation_function="gelu_new")  # fmt: skip
    model = GPT2LMHeadModel(config).to(torch.bfloat16).float()  # weights Megatron would hold (bf16)
    hf = root / "hf"
    model.save_pretrained(hf)
    sd = model.state_dict()
    hd = width // HEADS
    args = argparse.Namespace(
        num_layers=layers, hidden_size=width, ffn_hidden_size=4 * width, num_attention_heads=HEADS,
        kv_channels=hd, max_position_embeddings=SEQ, padded_vocab_size=VOCAB, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, bias_gelu_fusion=True, add_bias_linear=True, layernorm_epsilon=1e-5,
        position_embedding_type="learned_absolute", normalization="LayerNorm", bf16=True, lr=3e-4,
    )  # fmt: skip
    folder = root / "meg" / "iter_0001000"
    per = layers // pp
    for stage in range(pp):
        for rank in range(tp):
            shard: dict[str, torch.Tensor] = {}

            def col(t: torch.Tensor, rank: int = rank) -> torch.Tensor:
                return t.chunk(tp, dim=0)[rank].to(torch.bfloat16).clone()

            for local, i in enumerate(range(stage * per, (stage + 1) * per)):
                h, m = f"transformer.h.{i}.", f"decoder.layers.{local}."
                w = sd[h + "attn.c_attn.weight"].t()  # [3C, C]: q, k, v of all heads
                b = sd[h + "attn.c_attn.bias"]
                qkv_w = [t.chunk(tp, dim=0)[rank].reshape(HEADS // tp, hd, width) for t in w.split(width)]
                qkv_b = [t.chunk(tp, dim=0)[rank].reshape(HEADS // tp, hd) for t in b.split(width)]
                shard[m + "self_attention.linear_qkv.weight"] = (
                    torch.stack(qkv_w, 1).reshape(-1, width).bfloat16()
                )
                shard[m + "self_attention.linear_qkv.bias"] = torch.stack(qkv_b, 1).reshape(-1).bfloat16()
                shard[m + "self_attention.linear_proj.weight"] = (
                    sd[h + "attn.c_proj.weight"].t().chunk(tp, 1)[rank].bfloat16()
                )
                shard[m + "self_attention.linear_proj.bias"] = sd[h + "attn.c_proj.bias"].bfloat16()
                shard[m + "mlp.linear_fc1.weight"] = col(sd[h + "mlp.c_fc.weight"].t())
                shard[m + "mlp.linear_fc1.bias"] = col(sd[h + "mlp.c_fc.bias"])
                shard[m + "mlp.linear_fc2.weight"] = (
                    sd[h + "mlp.c_proj.weight"].t().chunk(tp, 1)[rank].bfloat16()
                )
                shard[m + "mlp.linear_fc2.bias"] = sd[h + "mlp.c_proj.bias"].bfloat16()
                for ln, name in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                    shard[m + name + ".weight"] = sd[h + ln + ".weight"].bfloat16()
                    shard[m + name + ".bias"] = sd[h + ln + ".bias"].bfloat16()
            if stage == 0:
                shard["embedding.word_embeddings.weight"] = col(sd["transformer.wte.weight"])
                shard["embedding.position_embeddings.weight"] = sd["transformer.wpe.weight"].bfloat16()
            if stage == pp - 1:
                shard["decoder.final_layernorm.weight"] = sd["transformer.ln_f.weight"].bfloat16()
                shard["decoder.final_layernorm.bias"] = sd["transformer.ln_f.bias"].bfloat16()
                shard["output_layer.weight"] = col(sd["transformer.wte.weight"])
            name = f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else "")
            (folder / name).mkdir(parents=True)
            ckpt = {"args": args, "checkpoint_version": 3.0, "iteration": 1000, "model": shard,
                    "rng_state": [{"np_rng_state": np.random.get_state()}]}  # fmt: skip
            torch.save(ckpt, folder / name / "model_optim_rng.pt")
    (root / "meg" / "latest_checkpointed_iteration.txt").write_text("1000")
    return hf, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(child(opts.child, opts.check)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs: dict[str, list[dict]] = {"safetensors": [], "megatron": []}
    with tempfile.TemporaryDirectory() as tmp:
        hf, meg = write(Path(tmp), opts.layers, opts.width, opts.tp, opts.pp)
        disk = {k: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20 for k, p in
                (("safetensors", hf), ("megatron", meg))}  # fmt: skip
        for repeat in range(opts.repeats):
            for kind, folder in (("safetensors", hf), ("megatron", meg)):
                cmd = [sys.executable, __file__, "--child", str(folder)]
                if kind == "megatron" and repeat == 0:
                    cmd += ["--check", str(hf)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_mib_above_baseline")}
              for k, v in runs.items()}  # fmt: skip
    ratios = {
        m: median["megatron"][m] / median["safetensors"][m] for m in ("seconds", "peak_mib_above_baseline")
    }
    result = {
        "shape": {
            "layers": opts.layers,
            "width": opts.width,
            "heads": HEADS,
            "vocab": VOCAB,
            "tp": opts.tp,
            "pp": opts.pp,
        },
        "disk_mib": disk,
        "median": median,
        "megatron_over_safetensors": ratios,
        "max_abs_logit_diff": runs["megatron"][0]["max_abs_logit_diff"],
        "runs": runs,
        "environment": environment(threads=1, repeats=opts.repeats),
    }
    print(json.dumps({k: result[k] for k in ("shape", "disk_mib", "median", "megatron_over_safetensors",
                                               "max_abs_logit_diff")}, indent=1))  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "bench_megatron_load.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
