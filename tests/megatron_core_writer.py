"""One tensor-parallel rank of a tiny megatron.core GPTModel on the CPU, saved as Megatron-LM saves it.

Run by tests/test_megatron.py as ``python megatron_core_writer.py RUN_DIR`` in WORLD_SIZE processes (gloo).
The model is megatron-core's own ``GPTModel`` (local layer spec: ``input_layernorm``, ``linear_qkv``,
``linear_proj``, ``pre_mlp_layernorm``, ``linear_fc1`` with the fused bias-GELU, ``linear_fc2``), tensor
parallel over the processes; each rank saves ``iter_0000007/mp_rank_0R/model_optim_rng.pt`` with the entries
of Megatron-LM's ``generate_state_dict`` (``args`` as an ``argparse.Namespace``, ``checkpoint_version``,
``iteration``, ``model.state_dict_for_save_checkpoint()``, the RNG state with numpy's), and rank 0 writes
the vocabulary-gathered logits of a fixed batch to ``logits.pt``.

Two CPU stand-ins replace CUDA-only helpers that do no arithmetic: the attention's scratch buffer
(``GlobalMemoryBuffer``, allocated on the GPU) and the CUDA RNG tracker's ``fork`` around the attention
dropout (dropout is 0 and the model is in eval mode).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LAYERS, HIDDEN, HEADS, FFN, SEQ, VOCAB, ITERATION = 2, 16, 4, 40, 12, 128, 7


def main(run: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    from megatron.core import utils as mcore_utils
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)

    class CPUBuffer(mcore_utils.GlobalMemoryBuffer):
        def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
            return torch.empty(tensor_shape, dtype=dtype)

    parallel_state._GLOBAL_MEMORY_BUFFER = CPUBuffer()
    tp_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        tensor_model_parallel_size=world,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=True,  # Megatron-LM's default (--bias-gelu-fusion): the tanh GELU
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True,
    )
    g = torch.Generator().manual_seed(11)  # the same draws on every rank: replicated weights agree
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            param.copy_(base + 0.3 * torch.randn(param.shape, generator=g))
    model.eval()
    args = argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        kv_channels=HIDDEN // HEADS, max_position_embeddings=SEQ, padded_vocab_size=VOCAB,
        tensor_model_parallel_size=world, pipeline_model_parallel_size=1, layernorm_epsilon=1e-5,
        bias_gelu_fusion=True, openai_gelu=False, add_bias_linear=True, swiglu=False,
        position_embedding_type="learned_absolute", normalization="LayerNorm",
        untie_embeddings_and_output_weights=False, params_dtype=torch.float32, lr=1e-4,
        lr_decay_style="constant", lr_warmup_iters=0, ckpt_format="torch", transformer_impl="local",
    )  # fmt: skip
    ckpt = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "model": model.state_dict_for_save_checkpoint(),
        "rng_state": [
            {
                "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "rng_tracker_states": {},
            }
        ],
        "num_floating_point_operations_so_far": 0.0,
    }
    file = run / f"iter_{ITERATION:07d}" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, file)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ).unsqueeze(0).expand(2, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ), diagonal=1).bool()  # True = masked (causal)
    with torch.no_grad():
        local = model(ids, pos, attention_mask=mask).contiguous()  # [b, s, vocab / world]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    if rank == 0:
        torch.save({"input_ids": ids, "logits": torch.cat(parts, dim=-1)}, run / "logits.pt")
        (run / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
