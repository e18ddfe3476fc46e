"""Megatron-LM / Megatron-DeepSpeed GPT checkpoints (``--ckpt-format torch``) read as ``GPT2LMHeadModel``.

Megatron-LM's ``save_checkpoint`` writes, per model-parallel rank,
``iter_{N:07d}/mp_rank_TT/model_optim_rng.pt`` (``mp_rank_TT_PPP`` with pipeline parallelism; ``release/``
for a released model) and the iteration of the last complete save in ``latest_checkpointed_iteration.txt``
beside the ``iter_*`` folders. Each file is one ``torch.save`` of::

    {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": N,
     "model": model.state_dict_for_save_checkpoint(),        # this rank's shard
     "optimizer": ..., "opt_param_scheduler": {...}, "rng_state": [...], ...}

Megatron-DeepSpeed writes the same with ``--deepspeed`` through DeepSpeed's engine instead:
``global_stepN/mp_rank_TT_model_states.pt`` with the model's flat state dict under ``module``, Megatron's
entries (``args``, ``iteration``, ...) beside it and the scheduler under ``lr_scheduler``, plus the same
tracker file (which tells it from a plain DeepSpeed save). Its pipeline engine (``module`` None, one
``layer_*-model_states.pt`` per layer) is refused with Megatron-DeepSpeed's ``deepspeed_to_megatron.py``.

**Reading it safely.** ``args`` is an ``argparse.Namespace`` and ``rng_state`` holds numpy arrays
(``np.random.get_state()``); newer versions put Megatron enums into ``args``. The file is read with
``torch.load(weights_only=True)`` through :func:`commute_cli.io.safefiles.torch_load_allowing`: the one class
built is ``argparse.Namespace`` (a bag of attributes); numpy's and Megatron's globals are kept as inert
records (nothing of theirs runs); any other global is refused with one line naming it.

**Two layouts of ``model``** (both GPT-2's architecture when ``args`` says so):

- *legacy* (``megatron.legacy`` models, Megatron-DeepSpeed): nested dicts,
  ``language_model.embedding.{word,position}_embeddings.weight``, ``language_model.encoder`` (``transformer``
  before 2021) ``.layers.N.{input_layernorm, self_attention.query_key_value (attention. before 2021),
  self_attention.dense, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}``,
  ``.final_layernorm``; ``language_model.output_layer`` when untied; ``word_embeddings_for_head`` on the last
  pipeline stage.
- *core* (``megatron.core`` ``GPTModel``): ``embedding.{word,position}_embeddings.weight``,
  ``decoder.layers.N.{input_layernorm, self_attention.linear_qkv, self_attention.linear_proj,
  pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}`` (Transformer Engine fuses the norms into
  ``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*``), ``decoder.final_layernorm``, ``output_layer``.

**Mapping to GPT-2** (each checked in tests/test_megatron.py against an independent forward pass):

- Megatron's ``Linear`` weights are ``[out, in]``, GPT-2's ``Conv1D`` ``[in, out]``: transposed.
- The fused QKV rows are, per rank, ``[heads, 3, head_dim]`` for ``checkpoint_version`` >= 2 (and the core
  layout), ``[heads, head_dim, 3]`` for 1.0 and ``[3, heads, head_dim]`` for 0 (the ordering
  ``fix_query_key_value_ordering`` of Megatron-LM's checkpointing undoes); GPT-2 wants ``[3, heads,
  head_dim]`` over all heads, so each rank's rows are split into q, k, v first and then joined across ranks.
- Tensor-parallel shards (``mp_rank_00``, ``mp_rank_01``, ...) are merged as Megatron split them: the
  column-parallel QKV and ``h_to_4h``/``fc1`` weights and biases and the vocabulary-parallel word embeddings
  (and an untied output layer) along dim 0, the row-parallel ``dense``/``proj`` and ``4h_to_h``/``fc2``
  weights along dim 1; their biases and the norms are replicated (rank 0's are used).
- Pipeline stages (``mp_rank_TT_PPP``) are joined in stage order, each stage's layers renumbered after
  those of the stages before it; interleaved (virtual) pipelines (``model0``, ``model1``) and expert
  parallelism are refused with the command that re-shards the checkpoint.
- The output layer is tied to the word embeddings unless ``untie_embeddings_and_output_weights``. The
  vocabulary stays Megatron's padded one (``padded_vocab_size``): the padded rows are part of the softmax
  Megatron trained with, so the loss, its gradients and its curvature are those of the run; the tokenizer's
  ids are the first rows.
- The MLP activation is what Megatron ran: the tanh GELU when ``openai_gelu`` or the fused bias-GELU
  (``bias_gelu_fusion``, the default with biases) was on, else the exact GELU. Megatron without biases
  (``add_bias_linear=False``) gets GPT-2's biases as frozen zeros, as for nanoGPT.
- What GPT-2 cannot express (rotary positions, RMSNorm, SwiGLU, grouped-query attention, post-norm
  residuals, zero-centred norms, ``kv_channels`` other than ``hidden/heads``, mixture of experts) is refused
  with one line naming it.

Finding and reading the files is :mod:`commute_cli.io.megatron_files` (re-exported here): the step is
``iteration``; the learning rate (:func:`learning_rate`) the optimizer's param group (Megatron's scheduler
sets it for the next update right after each step), else the scheduler's state through Megatron's
``OptimizerParamScheduler.get_lr`` formula, else ``args.lr`` for a constant schedule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io.megatron_files import (  # noqa: F401 (re-exported: the files' side of the format)
    CHECKPOINT_FILE,
    EXPORT_HINT,
    RESHARD,
    TRACKER_FILE,
    args_of,
    checkpoint_files,
    is_deepspeed_dir,
    is_megatron_dir,
    learning_rate,
    model_tree,
    optimizer_state,
    rank_files,
    read_file,
    step,
    tracker_iteration,
)
from commute_cli.io.nanogpt import strip_prefixes
from commute_cli.io.safefiles import InertRecord

# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _Layout:
    """The shape facts the merge needs: heads, head size, checkpoint version, tensor/pipeline sizes."""

    heads: int
    head_dim: int
    version: float
    tp: int
    pp: int


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[strip_prefixes(name)] = value
    return out


_LAYER_RE = re.compile(r"^(?:language_model\.(?:encoder|transformer)|decoder)\.layers\.(\d+)\.(.+)$")
_OPS = {  # Megatron's name within a layer -> (GPT-2's module, how tensor parallelism split it)
    "input_layernorm": ("ln_1", "replicated"),
    "self_attention.linear_qkv.layer_norm": ("ln_1", "replicated"),  # TE fused norm (…_weight/_bias)
    "attention.query_key_value": ("attn.c_attn", "qkv"),
    "self_attention.query_key_value": ("attn.c_attn", "qkv"),
    "self_attention.linear_qkv": ("attn.c_attn", "qkv"),
    "attention.dense": ("attn.c_proj", "row"),
    "self_attention.dense": ("attn.c_proj", "row"),
    "self_attention.linear_proj": ("attn.c_proj", "row"),
    "post_attention_layernorm": ("ln_2", "replicated"),
    "pre_mlp_layernorm": ("ln_2", "replicated"),
    "mlp.linear_fc1.layer_norm": ("ln_2", "replicated"),
    "mlp.dense_h_to_4h": ("mlp.c_fc", "column"),
    "mlp.linear_fc1": ("mlp.c_fc", "column"),
    "mlp.dense_4h_to_h": ("mlp.c_proj", "row"),
    "mlp.linear_fc2": ("mlp.c_proj", "row"),
}
_TOP = {  # outside the layers: GPT-2 name, split
    "language_model.embedding.word_embeddings.weight": ("transformer.wte.weight", "column"),
    "embedding.word_embeddings.weight": ("transformer.wte.weight", "column"),
    "language_model.embedding.position_embeddings.weight": ("transformer.wpe.weight", "replicated"),
    "embedding.position_embeddings.weight": ("transformer.wpe.weight", "replicated"),
    "language_model.encoder.final_layernorm.weight": ("transformer.ln_f.weight", "replicated"),
    "language_model.encoder.final_layernorm.bias": ("transformer.ln_f.bias", "replicated"),
    "language_model.transformer.final_layernorm.weight": ("transformer.ln_f.weight", "replicated"),
    "language_model.transformer.final_layernorm.bias": ("transformer.ln_f.bias", "replicated"),
    "decoder.final_layernorm.weight": ("transformer.ln_f.weight", "replicated"),
    "decoder.final_layernorm.bias": ("transformer.ln_f.bias", "replicated"),
    "language_model.output_layer.weight": ("lm_head.weight", "column"),
    "output_layer.weight": ("lm_head.weight", "column"),
    "word_embeddings_for_head.weight": ("lm_head.weight", "column"),
}
_IGNORED = ("._extra_state", ".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def _gpt2_name(key: str) -> tuple[str, str, int | None] | None:
    """(GPT-2 name, split kind, layer index or None) of a Megatron key; None for keys that hold no weight."""
    if key.endswith(_IGNORED) or key.endswith("._extra_state"):
        return None
    if key in _TOP:
        return (*_TOP[key], None)
    match = _LAYER_RE.match(key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        op, _, leaf = rest.rpartition(".")
        if leaf.startswith("layer_norm_"):  # TE: linear_qkv.layer_norm_weight
            op, leaf = f"{op}.layer_norm", leaf[len("layer_norm_") :]
        if op in _OPS and leaf in ("weight", "bias"):
            module, split = _OPS[op]
            return f"transformer.h.{{}}.{module}.{leaf}", split, index
    raise CommuteError(
        f"the Megatron checkpoint has a weight commute cannot place in GPT-2: {key}",
        hint=EXPORT_HINT,
    )


def _split_qkv(t: torch.Tensor, lay: _Layout, heads: int) -> tuple[torch.Tensor, ...]:
    """One rank's fused QKV rows as (q, k, v), each ``[heads * head_dim, ...]`` (module docstring)."""
    rest = t.shape[1:]
    hd = lay.head_dim
    if lay.version >= 2.0:
        grouped = t.reshape(heads, 3, hd, *rest).transpose(0, 1)
    elif lay.version == 1.0:
        grouped = t.reshape(heads, hd, 3, *rest).permute(2, 0, 1, *range(3, 3 + len(rest)))
    else:
        grouped = t.reshape(3, heads, hd, *rest)
    return tuple(grouped[i].reshape(heads * hd, *rest) for i in range(3))


def _merge(name: str, split: str, parts: list[torch.Tensor], lay: _Layout) -> torch.Tensor:
    """One tensor from its tensor-parallel shards (rank order); QKV rows reordered to GPT-2's."""
    if split == "qkv":
        local = lay.heads // len(parts)
        qkv = [_split_qkv(p, lay, local) for p in parts]
        return torch.cat([torch.cat([q[i] for q in qkv], dim=0) for i in range(3)], dim=0)
    if split == "replicated" or len(parts) == 1:
        return parts[0]
    if split == "column":
        return torch.cat(parts, dim=0)
    return parts[0] if name.endswith(".bias") else torch.cat(parts, dim=1)  # row-parallel


def _stage(shards: list[dict[str, Any]], lay: _Layout, file: Path) -> dict[str, tuple[str, int | None, Any]]:
    """One pipeline stage's GPT-2-named tensors (name template, layer, tensor) from its TP shards."""
    flat = [_flatten(model_tree(s, file)) for s in shards]
    out: dict[str, tuple[str, int | None, Any]] = {}
    for key in flat[0]:
        placed = _gpt2_name(key)
        if placed is None:
            continue
        name, split, layer = placed
        parts = []
        for rank, shard in enumerate(flat):
            value = shard.get(key)
            if not isinstance(value, torch.Tensor):
                raise CommuteError(
                    f"{file.parent.parent}: tensor-parallel rank {rank} has no tensor {key}",
                    hint="the checkpoint is incomplete; re-copy it",
                )
            parts.append(value)
        out[key] = (name, layer, _merge(name, split, parts, lay))
    return out


def _num(args: Mapping[str, Any], key: str, file: Path, default: Any = None) -> int:
    value = args.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CommuteError(f"{file}: args.{key} is {value!r}, expected a positive integer", hint=EXPORT_HINT)
    return value


def _position_type(args: Mapping[str, Any]) -> str:
    """``learned_absolute`` for GPT-2's positions, else what ``args`` names (Megatron-DeepSpeed keeps an enum,
    ``PositionEmbeddingType.absolute`` = 2, read as an inert record)."""
    if args.get("use_rotary_position_embeddings"):
        return "rope"
    value = args.get("position_embedding_type", "learned_absolute")
    if isinstance(value, InertRecord):
        absolute = value.name.endswith("PositionEmbeddingType") and value.args == (2,)
        return "learned_absolute" if absolute else f"{value.name}{value.args}"
    return "learned_absolute" if str(value) in ("learned_absolute", "absolute") else str(value)


def _refuse_unsupported(args: Mapping[str, Any], folder: Path) -> None:
    heads, hidden = args.get("num_attention_heads"), args.get("hidden_size")
    experts = args.get("num_experts") or 0
    experts = max(experts) if isinstance(experts, (list, tuple)) and experts else experts
    position = _position_type(args)
    norm = str(args.get("normalization", "LayerNorm"))
    checks = [
        (position != "learned_absolute", f"{position} positions (not GPT-2's learned ones)"),
        (norm.lower() != "layernorm", f"{norm} norms"),
        (bool(args.get("swiglu")) or bool(args.get("glu_activation")), "a gated (GLU) MLP"),
        (bool(args.get("squared_relu")), "a squared-ReLU MLP"),
        (
            bool(args.get("group_query_attention")) and args.get("num_query_groups") not in (None, heads),
            "grouped-query attention",
        ),
        (bool(args.get("apply_residual_connection_post_layernorm")), "post-norm residuals"),
        (bool(args.get("apply_layernorm_1p")), "zero-centred norms (apply_layernorm_1p)"),
        (bool(args.get("qk_layernorm")), "query/key norms"),
        (isinstance(experts, int) and experts > 1, "a mixture of experts"),
        (
            isinstance(heads, int)
            and isinstance(hidden, int)
            and args.get("kv_channels") not in (None, hidden // max(heads, 1)),
            "kv_channels other than hidden_size / num_attention_heads",
        ),
        (not bool(args.get("add_position_embedding", True)), "no position embeddings"),
    ]
    for bad, what in checks:
        if bad:
            raise CommuteError(f"{folder} is a Megatron model with {what}", hint=EXPORT_HINT)


def _activation(args: Mapping[str, Any]) -> str:
    """The GELU Megatron ran: tanh form for ``openai_gelu`` or the fused bias-GELU, else exact (erf)."""
    fused = bool(args.get("bias_gelu_fusion", True)) and bool(args.get("add_bias_linear", True))
    return "gelu_new" if args.get("openai_gelu") or fused else "gelu"


@dataclass
class MegatronModel:
    """A Megatron checkpoint as GPT-2: ``config`` (``GPT2Config``), ``state`` (GPT-2 names and layout), the
    names of zero biases to freeze, and the raw ``args``/``iteration`` of its rank-0 file."""

    config: Any
    state: dict[str, torch.Tensor]
    frozen: set[str]
    args: dict[str, Any]
    iteration: int | None


def _config(args: Mapping[str, Any], file: Path, vocab: int, tied: bool) -> Any:
    from transformers import GPT2Config

    hidden = _num(args, "hidden_size", file)
    return GPT2Config(
        vocab_size=vocab,
        n_positions=_num(args, "max_position_embeddings", file),
        n_embd=hidden,
        n_layer=_num(args, "num_layers", file),
        n_head=_num(args, "num_attention_heads", file),
        n_inner=_num(args, "ffn_hidden_size", file, 4 * hidden),
        activation_function=_activation(args),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=float(args.get("layernorm_epsilon", 1e-5)),
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
    )


def read_config(folder: Path) -> Any:
    """The ``GPT2Config`` of the checkpoint in ``folder`` from its rank-0 ``args`` (no weights merged)."""
    files = checkpoint_files(folder)
    file = files[min(files)]
    ckpt = read_file(file)
    args = args_of(ckpt)
    if not args:
        raise CommuteError(f"{file} has no args (argparse.Namespace)", hint=EXPORT_HINT)
    _refuse_unsupported(args, Path(folder))
    tree = _flatten(model_tree(ckpt, file))
    wte = next((tree[k] for k in _TOP if _TOP[k][0] == "transformer.wte.weight" and k in tree), None)
    tp = max(t for t, _ in files) + 1
    padded = args.get("padded_vocab_size")
    vocab = padded if isinstance(padded, int) else (wte.shape[0] * tp if wte is not None else None)
    if not isinstance(vocab, int):
        raise CommuteError(f"{file}: no padded_vocab_size in args and no word embeddings", hint=EXPORT_HINT)
    return _config(args, file, vocab, tied=not bool(args.get("untie_embeddings_and_output_weights")))


def load(folder: Path) -> MegatronModel:
    """Merge every rank of the checkpoint in ``folder`` into GPT-2's names and layout (module docstring)."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    tp, pp = max(t for t, _ in files) + 1, max(p for _, p in files) + 1
    first = read_file(files[(0, 0)])
    args = args_of(first)
    config = read_config(folder)
    version = first.get("checkpoint_version", 0)
    lay = _Layout(
        heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        version=float(version) if isinstance(version, (int, float)) else 0.0,
        tp=tp,
        pp=pp,
    )
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for stage in range(pp):
        shards = [first if (t, stage) == (0, 0) else read_file(files[(t, stage)]) for t in range(tp)]
        placed = _stage(shards, lay, files[(0, stage)])
        layers = sorted({layer for _, layer, _ in placed.values() if layer is not None})
        shift = offset if layers and layers[0] == 0 else 0  # stage-local numbering (Megatron's own)
        for key, (name, layer, tensor) in placed.items():
            target = name.format(layer + shift) if layer is not None else name
            if target == "lm_head.weight" and config.tie_word_embeddings:
                continue  # the last stage's copy of the tied embeddings
            if target in state:
                raise CommuteError(
                    f"{folder}: two tensors for {target} (the second from {key})", hint=EXPORT_HINT
                )
            state[target] = tensor
        offset = max(offset, (layers[-1] + shift + 1) if layers else offset)
    if offset != config.n_layer:
        raise CommuteError(
            f"{folder} holds {offset} transformer layers but its args say num_layers={config.n_layer}",
            hint="the checkpoint is incomplete, or re-shard it: " + RESHARD.format(src=folder.parent),
        )
    out: dict[str, torch.Tensor] = {}
    for name in list(state):  # in the saved dtype: the model's parameters convert while they copy
        tensor = state.pop(name)
        conv = name.endswith(("c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "mlp.c_proj.weight"))
        out[name] = tensor.t().contiguous() if conv else tensor
    frozen: set[str] = set()
    for i in range(config.n_layer):
        for module in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight, bias = out.get(f"transformer.h.{i}.{module}.weight"), f"transformer.h.{i}.{module}.bias"
            if weight is not None and bias not in out:
                out[bias] = torch.zeros(weight.shape[-1] if weight.dim() == 2 else weight.shape[0])
                frozen.add(bias)
    it = first.get("iteration")
    iteration = int(it) if isinstance(it, int) and not isinstance(it, bool) else None
    return MegatronModel(config=config, state=out, frozen=frozen, args=args, iteration=iteration)


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every rank file (the preflight: each file reads safely)."""
    found: dict[str, tuple[int, ...]] = {}
    for (t, p), file in sorted(checkpoint_files(folder).items()):
        tree = _flatten(model_tree(read_file(file), file))
        found.update(
            {f"mp_rank_{t:02d}_{p:03d}/{k}": tuple(v.shape) for k, v in tree.items() if hasattr(v, "shape")}
        )
    return found
