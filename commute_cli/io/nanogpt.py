"""nanoGPT ``ckpt.pt`` files read as the equivalent transformers ``GPT2LMHeadModel``.

nanoGPT (karpathy/nanoGPT, ``train.py``) saves one dict with ``torch.save``::

    {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
     "model_args": {n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout},
     "iter_num": int, "best_val_loss": tensor, "config": {...}}

It holds tensors, numbers, strings and plain containers only, so it is read with
``torch.load(weights_only=True)`` (memory-mapped: metadata reads do not load the weights).

The model is GPT-2's architecture with four differences from transformers' ``GPT2LMHeadModel``, each mapped
exactly (checked in tests/test_nanogpt.py against an independent forward pass, logits equal to 1e-5):

- nanoGPT's ``nn.Linear`` weights are ``[out, in]``; transformers' ``Conv1D`` stores ``[in, out]``: the four
  projection weights (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) are transposed.
- ``bias=False`` models have no Linear or LayerNorm biases: the GPT-2 biases are set to zero and frozen
  (``requires_grad=False``), so gradients and Hessian-vector products run over nanoGPT's own parameters only.
- nanoGPT's MLP uses the exact GELU (``nn.GELU()``): ``activation_function="gelu"``, not GPT-2's tanh form.
- ``lm_head.weight`` is tied to ``transformer.wte.weight`` (saved under both names); an untied file keeps
  both.

Keys of a ``torch.compile``-d model (``_orig_mod.``) or of a DDP-wrapped one (``module.``) are stripped; the
causal-mask buffer ``attn.bias`` of nanoGPT's slow attention path is dropped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io.safefiles import torch_load

PROJECTIONS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BIASED = ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_prefixes(key: str) -> str:
    """``key`` without ``torch.compile``'s ``_orig_mod.`` and DDP's ``module.`` (in any order, repeated)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def read(file: Path) -> dict[str, Any]:
    """The checkpoint dict of a nanoGPT ``ckpt.pt`` (weights_only, memory-mapped); else CommuteError."""
    ckpt = torch_load(file, "checkpoint")
    if not is_nanogpt(ckpt):
        keys = ", ".join(map(str, list(ckpt)[:6])) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CommuteError(
            f"{file} is not a nanoGPT checkpoint (it has {keys}; expected model, model_args, iter_num)",
            hint="pass a nanoGPT ckpt.pt, or a folder with config.json and model.safetensors",
        )
    return ckpt


def is_nanogpt(obj: Any) -> bool:
    """A dict with nanoGPT's ``model`` (tensors by name) and ``model_args`` entries."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("model"), dict)
        and isinstance(obj.get("model_args"), dict)
        and all(isinstance(v, torch.Tensor) for v in obj["model"].values())
    )


def step(ckpt: dict[str, Any]) -> int | None:
    """``iter_num``: the number of optimizer updates the saved weights have had."""
    it = ckpt.get("iter_num")
    return int(it) if isinstance(it, int) and not isinstance(it, bool) else None


def state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The saved weights with wrapper prefixes stripped and the causal-mask buffers dropped."""
    out = {strip_prefixes(k): v for k, v in ckpt["model"].items()}
    return {k: v for k, v in out.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def _arg(args: dict[str, Any], key: str, file: Path) -> int:
    value = args.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CommuteError(f"{file}: model_args[{key!r}] is {value!r}, expected a positive integer")
    return value


def gpt2_config(ckpt: dict[str, Any], file: Path):
    """The ``GPT2Config`` of the equivalent transformers model (see the module docstring)."""
    from transformers import GPT2Config

    args = ckpt["model_args"]
    sd = state_dict(ckpt)
    wte, head = sd.get("transformer.wte.weight"), sd.get("lm_head.weight")
    tied = head is None or (wte is not None and head.shape == wte.shape and torch.equal(head, wte))
    vocab = _arg(args, "vocab_size", file)
    eos = 50256 if vocab > 50256 else None  # GPT-2's <|endoftext|>, which nanoGPT's data uses
    return GPT2Config(
        vocab_size=vocab,
        n_positions=_arg(args, "block_size", file),
        n_embd=_arg(args, "n_embd", file),
        n_layer=_arg(args, "n_layer", file),
        n_head=_arg(args, "n_head", file),
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=eos,
        eos_token_id=eos,
    )


def gpt2_state_dict(ckpt: dict[str, Any], config: Any) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(the weights under GPT2LMHeadModel's names and layout, names of the zero biases to freeze)."""
    sd = state_dict(ckpt)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        out[key] = value.t().contiguous() if key.endswith(PROJECTIONS) else value
    frozen: set[str] = set()
    modules = [f"transformer.h.{i}.{m}" for i in range(config.n_layer) for m in _BIASED] + [
        "transformer.ln_f"
    ]
    for module in modules:
        weight, bias = out.get(f"{module}.weight"), f"{module}.bias"
        if weight is not None and bias not in out:
            size = (
                weight.shape[-1] if weight.dim() == 2 else weight.shape[0]
            )  # Conv1D [in, out]; LayerNorm [d]
            out[bias] = torch.zeros(size, dtype=weight.dtype)
            frozen.add(bias)
    return out, frozen


def learning_rate(ckpt: dict[str, Any]) -> tuple[float | None, str]:
    """(lr of the next update, where it came from) of a nanoGPT checkpoint; (None, "") when unrecorded.

    nanoGPT sets ``param_group["lr"] = get_lr(iter_num)`` at the top of each iteration, before it evaluates
    and saves, so the optimizer state holds the rate of the update that follows the saved weights; that
    is preferred. Without it, ``config``: ``learning_rate`` when ``decay_lr`` is false, else nanoGPT's
    ``get_lr(iter_num)`` (linear warmup ``lr*(it+1)/(warmup_iters+1)``, cosine to ``min_lr`` at
    ``lr_decay_iters``; the formula of nanoGPT's current ``train.py``).
    """
    opt = ckpt.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("param_groups"), list) and opt["param_groups"]:
        lr = opt["param_groups"][0].get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            return float(lr), "ckpt.pt optimizer param_groups"
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("learning_rate"), (int, float)):
        return None, ""
    base = float(cfg["learning_rate"])
    if not cfg.get("decay_lr", True):
        return base, "ckpt.pt config learning_rate"
    it = step(ckpt)
    try:
        warm, decay, low = int(cfg["warmup_iters"]), int(cfg["lr_decay_iters"]), float(cfg["min_lr"])
    except (KeyError, TypeError, ValueError):
        return None, ""
    if it is None:
        return None, ""
    if it < warm:
        lr = base * (it + 1) / (warm + 1)
    elif it > decay or decay <= warm:
        lr = low
    else:
        ratio = (it - warm) / (decay - warm)
        lr = low + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base - low)
    return lr, "ckpt.pt config (nanoGPT get_lr)"
