"""Parameter groups: which part of the model each entry of a flat parameter vector belongs to.

Every inner product the criterion reports, ``< D g_L, H_a D g_l >``, is a sum over the entries of the flat
parameter vector (the order of :func:`commute_cli.engine.curvature.param_list`). Summing only the entries of
one parameter group gives that group's part of the product; the parts of a partition add up to the whole.
This module maps parameter names to group labels (``--decompose``) and lays the groups out as contiguous
segments of the flat vector, which is what the estimator sums over (:func:`segment_gram`).

Groupings (``spec``):

- ``kind``: ``embeddings``, ``attention``, ``mlp``, ``norms``, ``head`` (an untied output layer), ``other``;
- ``layer``: ``embeddings``, ``layer.0``, ``layer.1``, ..., ``final`` (the final norm and an untied head);
- ``module``: layer x kind: ``embeddings``, ``layer.0.attention``, ``layer.0.mlp``, ``layer.0.norms``, ...,
  ``final.norms``, ``head``;
- a regex map ``NAME=REGEX;NAME=REGEX;...``: the first pattern that matches a parameter's name
  (``re.search``) gives its group; unmatched parameters go to ``other``.

The names understood by the built-in groupings are those of Hugging Face GPT-2 (``transformer.wte``,
``transformer.h.3.attn.c_attn``, ``transformer.h.3.mlp.c_fc``, ``ln_1``, ``ln_f``), Llama/Mistral/Qwen-style
models (``model.embed_tokens``, ``model.layers.3.self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``,
``model.norm``, ``lm_head``), GPT-NeoX (``gpt_neox.layers.3.attention``, ``embed_in``, ``embed_out``) and
nanoGPT (``transformer.h.3.attn``, ``lm_head``). A tied output layer is the embedding tensor itself (it
appears once in ``param_list``), so its share is counted under ``embeddings``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from commute_cli.engine import curvature
from commute_cli.errors import CommuteError

#: built-in groupings (``--decompose``); anything containing ``=`` is a regex map
GROUPINGS = ("kind", "layer", "module")

_LAYER = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|decoder_layers)\.(\d+)(?:\.|$)")
_KIND_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "norms",
        re.compile(r"(?:^|\.)(?:ln_\w+|ln\d*|\w*layer_?norm\w*|\w*_norm|norm\w*|rms_?norm\w*)(?:\.|$)", re.I),
    ),
    (
        "embeddings",
        re.compile(
            r"(?:^|\.)(?:wte|wpe|embed_tokens|embed_positions|embed_in|word_embeddings|tok_embeddings|"
            r"embeddings?|position_embeddings)(?:\.|$)"
        ),
    ),
    (
        "attention",
        re.compile(
            r"(?:^|\.)(?:attn|self_attn|attention|self_attention|q_proj|k_proj|v_proj|o_proj|c_attn|"
            r"query_key_value|qkv_proj|wq|wk|wv|wo)(?:\.|$)"
        ),
    ),
    (
        "mlp",
        re.compile(
            r"(?:^|\.)(?:mlp|feed_forward|ffn|c_fc|gate_proj|up_proj|down_proj|dense_h_to_4h|"
            r"dense_4h_to_h|w1|w2|w3)(?:\.|$)"
        ),
    ),
    ("head", re.compile(r"(?:^|\.)(?:lm_head|embed_out|output|score)(?:\.|$)")),
)


_KIND_ORDER = ("embeddings", "attention", "mlp", "norms", "head", "other")


def kind_of(name: str) -> str:
    """The kind of a parameter from its name: embeddings, attention, mlp, norms, head or other.

    Norms are recognised first (``transformer.h.0.ln_1.weight`` is a norm even inside a block; Llama's
    ``input_layernorm`` and ``post_attention_layernorm`` too), then embeddings, attention, MLP and head.
    """
    for kind, pattern in _KIND_RULES:
        if pattern.search(name):
            return kind
    return "other"


def layer_of(name: str) -> int | None:
    """The transformer block index in a parameter name (``...h.3...``, ``...layers.3...``), else ``None``."""
    m = _LAYER.search(name)
    return None if m is None else int(m.group(1))


def _label(name: str, spec: str, rules: list[tuple[str, re.Pattern[str]]] | None) -> str:
    if rules is not None:
        for label, pattern in rules:
            if pattern.search(name):
                return label
        return "other"
    kind = kind_of(name)
    layer = layer_of(name)
    if spec == "kind":
        return kind
    if spec == "layer":
        if layer is not None:
            return f"layer.{layer}"
        return "embeddings" if kind == "embeddings" else "final"
    # module
    if layer is not None:
        return f"layer.{layer}.{kind}"
    if kind in ("embeddings", "head"):
        return kind
    return f"final.{kind}"


def parse_regex_map(spec: str) -> list[tuple[str, re.Pattern[str]]]:
    """``NAME=REGEX;NAME=REGEX`` -> ordered rules. Raises :class:`CommuteError` on a malformed entry."""
    rules: list[tuple[str, re.Pattern[str]]] = []
    for raw in spec.split(";"):
        item = raw.strip()
        if not item:
            continue
        label, sep, pattern = item.partition("=")
        label = label.strip()
        if not sep or not label or not pattern:
            raise CommuteError(
                f"--decompose: cannot read {item!r} as NAME=REGEX",
                hint="use kind, layer, module, or a map like 'attn=\\.attn\\.;mlp=\\.mlp\\.'",
            )
        try:
            rules.append((label, re.compile(pattern)))
        except re.error as err:
            raise CommuteError(
                f"--decompose: {pattern!r} is not a valid regular expression ({err})",
                hint="patterns are Python regular expressions matched anywhere in the parameter name",
            ) from err
    if not rules:
        raise CommuteError("--decompose: empty regex map", hint="use kind, layer, module or NAME=REGEX;...")
    return rules


def check_spec(spec: str) -> None:
    """Validate a ``--decompose`` value before any long work (raises :class:`CommuteError`)."""
    if "=" in spec:
        parse_regex_map(spec)
    elif spec not in GROUPINGS:
        raise CommuteError(
            f"--decompose must be kind, layer, module or a NAME=REGEX;... map, got {spec!r}",
            hint="e.g. --decompose kind",
        )


def label_names(names: Sequence[str], spec: str) -> list[str]:
    """One group label per parameter name under ``spec`` (see the module docstring)."""
    check_spec(spec)
    rules = parse_regex_map(spec) if "=" in spec else None
    return [_label(n, spec, rules) for n in names]


@dataclass(frozen=True)
class ParamGroups:
    """A partition of the flat parameter vector into labelled groups, as contiguous segments.

    Attributes:
        labels: the ``G`` group labels: for ``kind`` in the order embeddings, attention, mlp, norms, head,
            other; otherwise in order of first appearance in the flat vector (embeddings, layer.0, ...).
        segments: ``(start, stop, group)`` half-open ranges of the flat vector, covering it exactly once,
            consecutive parameters of the same group merged.
        size: length of the flat vector ``n``.
        spec: the grouping it was built from (part of cache keys).
    """

    labels: tuple[str, ...]
    segments: tuple[tuple[int, int, int], ...]
    size: int
    spec: str

    @property
    def n_groups(self) -> int:
        return len(self.labels)

    def counts(self) -> np.ndarray:
        """``[G]`` number of parameters in each group."""
        out = np.zeros(self.n_groups, dtype=np.int64)
        for start, stop, g in self.segments:
            out[g] += stop - start
        return out

    def mask(self, group: int) -> np.ndarray:
        """``[n]`` boolean mask of one group's entries (tests and references)."""
        m = np.zeros(self.size, dtype=bool)
        for start, stop, g in self.segments:
            if g == group:
                m[start:stop] = True
        return m


def groups_from_names(names: Sequence[str], sizes: Sequence[int], spec: str) -> ParamGroups:
    """:class:`ParamGroups` of parameters ``names`` with ``sizes`` entries each, laid out in that order."""
    per_param = label_names(names, spec)
    labels: list[str] = []
    index: dict[str, int] = {}
    segments: list[tuple[int, int, int]] = []
    pos = 0
    for label, size in zip(per_param, sizes, strict=True):
        if label not in index:
            index[label] = len(labels)
            labels.append(label)
        g = index[label]
        if segments and segments[-1][2] == g and segments[-1][1] == pos:
            segments[-1] = (segments[-1][0], pos + int(size), g)
        else:
            segments.append((pos, pos + int(size), g))
        pos += int(size)
    if spec == "kind":  # a fixed, readable order rather than first appearance
        order = sorted(range(len(labels)), key=lambda g: _KIND_ORDER.index(labels[g]))
        new_index = {old: new for new, old in enumerate(order)}
        labels = [labels[g] for g in order]
        segments = [(a, b, new_index[g]) for a, b, g in segments]
    return ParamGroups(tuple(labels), tuple(segments), pos, spec)


def param_groups(model: nn.Module, spec: str) -> ParamGroups:
    """The groups of ``model``'s flat parameter vector (:func:`~commute_cli.engine.curvature.param_list`)."""
    plist = curvature.param_list(model)
    return groups_from_names([n for n, _ in plist], [p.numel() for _, p in plist], spec)


def segment_gram(
    A: Tensor, B: Tensor, groups: ParamGroups, compute: torch.device | None = None
) -> np.ndarray:
    """Per-group Gram matrices ``out[g] = A[:, S_g] @ B[:, S_g].T`` in float64, ``[G, rows(A), rows(B)]``.

    ``S_g`` is group ``g``'s set of entries; summing ``out`` over ``g`` gives ``A @ B.T`` up to float64
    rounding. Each segment is accumulated like the estimator's full products (float64 chunks on
    ``compute``, default ``A``'s device), so the same arithmetic is done once more, split by group: no
    gradient or HVP pass.
    """
    if A.shape[-1] != groups.size or B.shape[-1] != groups.size:
        raise ValueError(f"vectors of length {A.shape[-1]}/{B.shape[-1]} against groups of {groups.size}")
    dev = A.device if compute is None else compute
    out = torch.zeros(groups.n_groups, A.shape[0], B.shape[0], dtype=torch.float64, device=dev)
    step = 1 << 20 if dev.type == "cuda" else 1 << 18
    for start, stop, g in groups.segments:
        for s in range(start, stop, step):
            e = min(stop, s + step)
            a = A[:, s:e].to(dev, non_blocking=True).double()
            b = B[:, s:e].to(dev, non_blocking=True).double()
            out[g] += a @ b.T
    return out.cpu().numpy()
