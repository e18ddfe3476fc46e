"""What reading torch distributed checkpoints safely costs (io/dcp.py), as ratios measured in one run.

1. ``.metadata`` at pretraining scale: the metadata DCP writes for a Llama-3-8B layout (32 layers, model +
   Adam's two moments + step per parameter) sharded over R ranks (one chunk per rank and tensor, FSDP's
   dim-0 shards), read by commute's safe path (protocol-2 re-encoding + torch's ``weights_only``
   unpickler) against plain ``pickle.loads`` (what torch does, unsafely). Metadata only: no tensor data.
2. Loading one model: the same GPT-2 (about 30M parameters) through ``io.checkpoints.load_model`` from an HF
   Trainer FSDP ``SHARDED_STATE_DICT`` folder (DCP) against its ``save_pretrained`` safetensors folder.

Printed and written to ``benchmarks/results/bench_dcp.json`` with the environment. Run:
``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_dcp.py``.
"""

from __future__ import annotations

import json
import pickle
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchenv import environment  # noqa: E402

LLAMA_8B = {"dim": 4096, "kv": 1024, "ffn": 14336, "vocab": 128256, "layers": 32}


def llama_8b_shapes() -> dict[str, tuple[int, ...]]:
    a = LLAMA_8B
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (a["vocab"], a["dim"])}
    for i in range(a["layers"]):
        p = f"layers.{i}."
        out |= {
            p + "attention.wq.weight": (a["dim"], a["dim"]),
            p + "attention.wk.weight": (a["kv"], a["dim"]),
            p + "attention.wv.weight": (a["kv"], a["dim"]),
            p + "attention.wo.weight": (a["dim"], a["dim"]),
            p + "feed_forward.w1.weight": (a["ffn"], a["dim"]),
            p + "feed_forward.w2.weight": (a["dim"], a["ffn"]),
            p + "feed_forward.w3.weight": (a["ffn"], a["dim"]),
            p + "attention_norm.weight": (a["dim"],),
            p + "ffn_norm.weight": (a["dim"],),
        }
    out |= {"norm.weight": (a["dim"],), "output.weight": (a["vocab"], a["dim"])}
    return out


def sharded_metadata(ranks: int):
    """DCP ``Metadata`` as ``FileSystemWriter`` records it for the 8B layout on ``ranks`` ranks."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    entries: dict[str, tuple[int, ...]] = {}
    for name, shape in llama_8b_shapes().items():
        entries[name] = shape
        for moment in ("exp_avg", "exp_avg_sq"):
            entries[f"optimizer.state.{name}.{moment}"] = shape
        entries[f"optimizer.state.{name}.step"] = ()
    state: dict[str, object] = {}
    storage: dict[object, object] = {}
    planner: dict[str, tuple] = {}
    offset = [0] * ranks
    for key, shape in entries.items():
        props = md.TensorProperties(dtype=torch.float32)
        if not shape:
            chunks = [md.ChunkStorageMetadata(offsets=torch.Size([]), sizes=torch.Size([]))]
        else:
            rows = -(-shape[0] // ranks)
            chunks = [
                md.ChunkStorageMetadata(
                    offsets=torch.Size([r * rows, *([0] * (len(shape) - 1))]),
                    sizes=torch.Size([min(rows, shape[0] - r * rows), *shape[1:]]),
                )
                for r in range(ranks)
                if r * rows < shape[0]
            ]
        state[key] = md.TensorStorageMetadata(properties=props, size=torch.Size(shape), chunks=chunks)
        for r, chunk in enumerate(chunks):
            length = 4 * max(1, int(torch.Size(chunk.sizes).numel()))
            index = md.MetadataIndex(fqn=key, offset=chunk.offsets, index=None)
            storage[index] = fs._StorageInfo(relative_path=f"__{r}_0.distcp", offset=offset[r], length=length)
            offset[r] += length
        planner[key] = tuple(key.split(".", 3)[:3]) if key.startswith("optimizer.") else (key,)
    return md.Metadata(state_dict_metadata=state, planner_data=planner, storage_data=storage), len(storage)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_metadata(ranks: int, folder: Path) -> dict:
    from commute_cli.io import dcp

    meta, chunks = sharded_metadata(ranks)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".metadata").open("wb") as fh:
        pickle.dump(meta, fh)  # what torch's FileSystemWriter.finish does
    (folder / "__0_0.distcp").write_bytes(b"")
    data = (folder / ".metadata").read_bytes()
    plain = best_of(lambda: pickle.loads(data))  # the file was written just above

    def safe() -> None:
        dcp._read_metadata.cache_clear()
        dcp.read_metadata(folder)

    ours = best_of(safe)
    assert dcp.read_metadata(folder) == pickle.loads(data)  # same object, read safely
    return {
        "ranks": ranks,
        "chunks": chunks,
        "metadata_mb": round(len(data) / 1e6, 2),
        "plain_pickle_s": round(plain, 3),
        "safe_read_s": round(ours, 3),
        "ratio_safe_over_plain": round(ours / plain, 2),
    }


def bench_load(folder: Path) -> dict:
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from transformers import GPT2Config, GPT2LMHeadModel

    from commute_cli.io import checkpoints as ck

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=8192, n_positions=256, n_embd=512, n_layer=8, n_head=8)
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    st, fsdp = folder / "safetensors" / "checkpoint-1", folder / "fsdp" / "checkpoint-1"
    model.save_pretrained(str(st))
    model.config.save_pretrained(str(fsdp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_cp.save(
            {"model": get_model_state_dict(model)},
            storage_writer=dist_cp.FileSystemWriter(str(fsdp / "pytorch_model_fsdp_0")),
            no_dist=True,
        )
    t_st = best_of(lambda: ck.load_model(st))
    t_dcp = best_of(lambda: ck.load_model(fsdp))
    a, b = ck.load_model(st), ck.load_model(fsdp)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    return {
        "parameters": n_params,
        "safetensors_s": round(t_st, 3),
        "fsdp_dcp_s": round(t_dcp, 3),
        "ratio_dcp_over_safetensors": round(t_dcp / t_st, 2),
    }


def main() -> None:
    threads = torch.get_num_threads()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["metadata"] = [bench_metadata(r, Path(tmp) / f"meta{r}") for r in (8, 64)]
        results["load_model"] = bench_load(Path(tmp) / "load")
    payload = {"environment": environment(threads), "results": results}
    for row in results["metadata"]:  # type: ignore[union-attr]
        print(
            f"8B metadata, {row['ranks']} ranks ({row['chunks']} chunks, {row['metadata_mb']} MB): safe read "
            f"{row['safe_read_s']} s vs pickle {row['plain_pickle_s']} s = {row['ratio_safe_over_plain']}x"
        )
    load = results["load_model"]
    print(
        f"load_model, {load['parameters']:,} parameters: FSDP DCP {load['fsdp_dcp_s']} s vs safetensors "  # type: ignore[index]
        f"{load['safetensors_s']} s = {load['ratio_dcp_over_safetensors']}x"  # type: ignore[index]
    )
    out = ROOT / "benchmarks" / "results" / "bench_dcp.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
