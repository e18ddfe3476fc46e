"""Token blocks of a domain: the bounded seeded draw, packing, the tokenizer guard, the block cache.

Two pipelines share one reader (:mod:`commute_cli.io.documents`):

- ``commute analyze`` draws its sample with :func:`sample_domain`: a *bounded* read that takes only the
  documents the sample needs, spread over the source's shards, and records where they came from. Its cost is
  the sample's, not the corpus's: the same for a 10 MB file and a folder of 1024 C4 shards.
- ``train``/``validate`` read whole domains with ``load_texts`` (optionally capped by ``max_chars``) and
  cut them with :func:`pack_blocks`; :func:`cached_blocks` keeps that result on disk.

Decisions worth knowing (also why):

- The bounded draw (:func:`sample_domain`): a seeded permutation of the shards; the first
  ``min(shards, MAX_SHARDS)`` of it each contribute an equal share of a pool of ``POOL_FACTOR`` times the
  sample's tokens, read from the start of the shard in file order (later shards in the permutation only fill
  in for shards that run out). The sample's blocks are drawn from the pool without replacement, in a seeded
  random order, so every design block mixes all the shards read, and a source smaller than the pool is
  sampled over its whole length. A shard is read from its start because a compressed stream cannot seek,
  and a ``.json.gz`` shard must give the same sample as the same ``.jsonl``. Same files, tokenizer, size and
  seed: the same token ids.
- A tokenizer that maps the text to almost nothing (fewer than ``MIN_TOKENS_PER_CHAR`` content tokens per
  character, special and unknown tokens not counted) is refused: an empty tokenizer (what ``AutoTokenizer``
  builds from a checkpoint saved without tokenizer files) turns every document into end-of-text tokens only,
  and the analysis would silently compare identical all-EOS blocks.
- Documents are separated by the tokenizer's EOS token. A tokenizer without one gets no separator at all (the
  documents are simply concatenated); no token is invented, because any id we picked would carry meaning
  the model never learned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io import atomic
from commute_cli.io.data import DEFAULT_TEXT_FIELD, Source, resolve_source, source_fingerprint
from commute_cli.io.documents import load_texts, no_text, open_stream, shard_documents, text_column

#: the bounded draw spreads a sample over at most this many shards (each costs one open and one chunk)
MAX_SHARDS = 16

#: the draw reads this many times the sample's tokens and picks the sample's blocks among them
POOL_FACTOR = 4

#: a tokenizer giving fewer content tokens per character than this is refused. Real tokenizers give
#: 0.15-0.35 on prose (GPT-2 ~0.25 on English; ~4-6 characters per token) and more on code and other
#: scripts; 0.02 is one token per 50 characters, far below any of them.
MIN_TOKENS_PER_CHAR = 0.02

#: the draw checks the tokenizer once it has tokenized this many characters (and again at the end)
GUARD_CHARS = 20_000

_CACHE_FORMAT = "commute-blocks/1"


# ----------------------------------------------------------------------------------------------- sample


@dataclass
class DomainSample:
    """The bounded sample of one domain: ``blocks`` ``[n, seq_len]`` int64 token ids and where they came from.

    ``provenance`` (written to ``run.json``): ``source``, ``kind``, ``text_column``, ``shards_total``,
    ``shards`` (per shard read, in read order: its ``name``, ``rows_read`` -- the first rows of the shard,
    counted in lines for text files --, ``documents`` used and ``tokens`` taken), totals ``documents``,
    ``characters`` and ``tokens_per_character`` of the text tokenized, and ``text_sha256`` (a hash of the
    documents' text as used, in order).
    """

    blocks: torch.Tensor
    provenance: dict[str, Any]


def _encode_prefix(tokenizer: Any, doc: str, want: int) -> tuple[list[int], int, bool, int]:
    """Tokenize no more of ``doc`` than its first ``want`` tokens need (no special tokens added).

    Returns ``(ids, keep, complete, chars)``: ``ids`` are the tokens of the first ``chars`` characters,
    of which the first ``keep`` are used; ``complete`` when they are the whole document. A prefix of the
    text is tokenized (16 characters per wanted token, growing 4x when short); its first ``want`` tokens
    are kept only if it gave at least 16 more, so the cut cannot change them (tokenizers merge within a
    few characters).
    """
    cap = 16 * want + 256
    while True:
        whole = cap >= len(doc)
        text = doc if whole else doc[:cap]
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if whole:
            return ids, min(len(ids), want), len(ids) <= want, len(text)
        if len(ids) >= want + 16:
            return ids, want, False, len(text)
        cap *= 4


def check_tokenizer_output(n_tokens: int, n_chars: int, where: str) -> None:
    """Refuse a tokenizer that maps text to almost nothing (see ``MIN_TOKENS_PER_CHAR``).

    ``n_tokens``: content tokens (special and unknown tokens not counted) of ``n_chars`` characters.
    Raises ``CommuteError`` when there are none, or fewer than ``MIN_TOKENS_PER_CHAR`` per character over
    at least 1000 characters.
    """
    if n_chars <= 0:
        return
    if n_tokens == 0 or (n_chars >= 1000 and n_tokens / n_chars < MIN_TOKENS_PER_CHAR):
        raise CommuteError(
            f"the tokenizer maps {where} to almost nothing: {n_tokens} tokens for {n_chars} characters "
            f"(real tokenizers give over {MIN_TOKENS_PER_CHAR:g} per character)",
            hint="the tokenizer is empty or wrong (a checkpoint saved without tokenizer files gets an empty "
            "one): pass --tokenizer with the tokenizer the model was trained with",
        )


def _content_count(tokenizer: Any, ids: Iterable[int]) -> int:
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        special.add(int(unk))
    return sum(1 for i in ids if i not in special)


def _local_shards(src: Source, order: list[int], batch: int) -> Iterator[tuple[Source, Any, int]]:
    """``(source, stream, index)`` of local files in ``order``: one stream per ``batch`` files, opened lazily,
    so that only the files read are handed to ``datasets`` (its setup costs ~1 ms per file)."""
    for start in range(0, len(order), batch):
        picked = order[start : start + batch]
        sub = Source(
            src.label, "files", builder=src.builder, files=[src.files[i] for i in picked], root=src.root
        )
        stream = open_stream(sub)
        if int(stream.num_shards) != len(
            picked
        ):  # pragma: no cover - a builder that splits files differently
            raise RuntimeError(f"datasets made {stream.num_shards} shards of {len(picked)} files")
        for index in range(len(picked)):
            yield sub, stream, index


def sample_domain(
    source: str,
    tokenizer: Any,
    seq_len: int,
    n: int,
    seed: int,
    *,
    domain: str | None = None,
    base_dir: Path | None = None,
    text_field: str | None = None,
    max_shards: int = MAX_SHARDS,
) -> DomainSample:
    """Draw ``n`` blocks of ``seq_len`` tokens from a domain, reading only what they need.

    The draw (module docstring): shards in a permutation seeded by ``seed``; the first
    ``m = min(shards, max_shards)`` each give ``ceil(POOL_FACTOR * n * seq_len / m)`` tokens of documents read
    from the shard's start (documents tokenized without special tokens, each followed by EOS, the last one
    cut where the share ends); later shards fill in for shards that run out. The token stream is cut into a
    pool of blocks of ``seq_len``, of which ``n`` are drawn without replacement by the same seeded generator
    (``torch.randperm``). Cost: at most ``m`` (plus fill-in) shard opens and about
    ``POOL_FACTOR * n * seq_len`` tokens of text, whatever the size of the corpus.

    Raises ``CommuteError`` when the whole source has fewer than ``n * seq_len`` tokens, for the reading
    errors of :func:`load_texts`, and when the tokenizer maps the text to almost nothing
    (:func:`check_tokenizer_output`).
    """
    if seq_len < 1 or n < 1:
        raise CommuteError(f"need a positive number of blocks and seq_len, got {n} x {seq_len}")
    src = resolve_source(source, domain=domain, base_dir=base_dir)
    column = text_column(src, text_field)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if src.kind == "files":
        total_shards = len(src.files)
        order = torch.randperm(total_shards, generator=gen).tolist()
        shard_iter = _local_shards(src, order, max(1, max_shards))
    else:
        stream = open_stream(src)
        total_shards = int(stream.num_shards)
        order = torch.randperm(total_shards, generator=gen).tolist()
        shard_iter = ((src, stream, index) for index in order)
    m = max(1, min(total_shards, max_shards))
    need = n * seq_len
    pool = POOL_FACTOR * need
    share = -(-pool // m)
    eos = getattr(tokenizer, "eos_token_id", None)
    label = f"domain {domain}" if domain else repr(src.label)
    ids: list[int] = []
    text_hash = hashlib.sha256()
    shards: list[dict[str, Any]] = []
    n_docs = n_chars = n_content = 0
    for shard_src, stream, index in shard_iter:
        if len(ids) >= pool:
            break
        got = docs = rows = 0
        for rows, doc in shard_documents(shard_src, stream, index, column, domain):  # noqa: B007
            want = min(share - got, pool - len(ids))
            encoded, keep, complete, chars = _encode_prefix(tokenizer, doc, want)
            n_chars += chars
            n_content += _content_count(tokenizer, encoded)
            if n_chars >= GUARD_CHARS:  # an empty tokenizer must not make us read the whole corpus
                check_tokenizer_output(n_content, n_chars, f"the text of {label}")
            piece = encoded[:keep] + ([int(eos)] if complete and eos is not None else [])
            ids.extend(piece)
            got += len(piece)
            docs += 1
            text_hash.update(doc[:chars].encode("utf-8", "surrogatepass") + b"\0")
            if got >= share or len(ids) >= pool:
                break
        shards.append(
            {
                "name": shard_src.shard_name(index, total_shards),
                "rows_read": rows,
                "documents": docs,
                "tokens": got,
            }
        )
        n_docs += docs
    if n_docs == 0:
        raise no_text(src, column, domain)
    check_tokenizer_output(n_content, n_chars, f"the text of {label}")
    if len(ids) < need:
        raise CommuteError(
            f"{label} has {len(ids)} tokens ({len(ids) // seq_len} blocks of {seq_len}), "
            f"fewer than the {n} blocks the sample needs",
            hint="add data, lower --samples, or shorten --seq-len",
        )
    n_pool = min(len(ids), pool) // seq_len
    chosen = torch.randperm(n_pool, generator=gen)[:n]
    blocks = torch.tensor(ids[: n_pool * seq_len], dtype=torch.long).view(n_pool, seq_len)[chosen]
    provenance: dict[str, Any] = {
        "source": src.label,
        "kind": src.kind,
        "text_column": column if src.builder != "text" else None,
        "shards_total": total_shards,
        "shards": shards,
        "documents": n_docs,
        "characters": n_chars,
        "tokens_per_character": n_content / n_chars if n_chars else None,
        "pool_blocks": n_pool,
        "blocks": chosen.tolist(),  # the sample's blocks as positions in the pool (shards in read order)
        "text_sha256": text_hash.hexdigest(),
    }
    if src.kind == "hub" and src.hub is not None:
        provenance["hub"] = {"dataset": src.hub[0], "config": src.hub[1], "split": "train"}
    return DomainSample(blocks, provenance)


# ----------------------------------------------------------------------------------------------- blocks


def pack_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, cut into ``[N, seq_len]`` int64 blocks, dropping the remainder.

    Each document is tokenized without special tokens and followed by ``tokenizer.eos_token_id`` (nothing when
    the tokenizer has no EOS, see the module docstring). ``N = total_tokens // seq_len``. Raises
    ``CommuteError`` when that is less than one block, or when the tokenizer maps the text to almost nothing
    (:func:`check_tokenizer_output`).
    """
    if seq_len < 1:
        raise CommuteError(f"seq_len must be positive, got {seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    batch = 256
    n_chars = n_content = 0
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        n_chars += sum(len(t) for t in chunk)
        for doc in encoded:
            n_content += _content_count(tokenizer, doc)
            ids.extend(doc)
            if eos is not None:
                ids.append(int(eos))
    check_tokenizer_output(n_content, n_chars, "the text")
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise CommuteError(
            f"the data gives {len(ids)} tokens, fewer than one block of seq_len={seq_len} needs",
            hint="add data or lower --seq-len",
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def sample_blocks(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct rows of ``blocks``, chosen by a CPU ``torch.Generator`` seeded with ``seed``.

    The same blocks, n and seed always give the same sample (in the same order), so every checkpoint is
    evaluated on the same sequences.
    """
    total = int(blocks.shape[0])
    if n < 1:
        raise CommuteError(f"the number of samples must be positive, got {n}")
    if n > total:
        raise CommuteError(
            f"asked for {n} samples but the data has only {total} blocks",
            hint="add data, lower the number of samples, or shorten --seq-len",
        )
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    index = torch.randperm(total, generator=gen)[:n]
    return blocks[index]


def split_parts(blocks: torch.Tensor, n_blocks_design: int, n_parts: int = 3) -> list[list[torch.Tensor]]:
    """Split a sample into ``n_blocks_design`` disjoint design blocks of ``n_parts`` disjoint parts each.

    MATH.md "Noise": every product in the criterion multiplies factors estimated on disjoint samples; with
    three parts per block, one part gives the gradients that become HVP vectors, one the HVPs, one the paired
    gradients. All parts have ``len(blocks) // (n_blocks_design * n_parts)`` rows; the remainder is unused.
    Rows are taken in order, so pass a shuffled sample (``sample_blocks``).
    """
    if n_blocks_design < 1 or n_parts < 1:
        raise CommuteError(f"need at least one block and one part, got {n_blocks_design} x {n_parts}")
    per_part = int(blocks.shape[0]) // (n_blocks_design * n_parts)
    if per_part < 1:
        raise CommuteError(
            f"{blocks.shape[0]} samples cannot fill {n_blocks_design} blocks x {n_parts} parts",
            hint=f"use at least {n_blocks_design * n_parts} samples, or fewer blocks",
        )
    out: list[list[torch.Tensor]] = []
    for b in range(n_blocks_design):
        base = b * n_parts * per_part
        out.append([blocks[base + p * per_part : base + (p + 1) * per_part] for p in range(n_parts)])
    return out


# ----------------------------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes token ids: its serialized model, vocab and EOS."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    h.update(json.dumps(sorted((int(k), str(v)) for k, v in added.items())).encode())
    h.update(repr(getattr(tokenizer, "eos_token_id", None)).encode())
    return h.hexdigest()


def cached_blocks(
    source: str,
    tokenizer: Any,
    seq_len: int,
    cache_dir: Path,
    *,
    domain: str | None = None,
    base_dir: Path | None = None,
    max_chars: int | None = None,
    text_field: str | None = None,
) -> torch.Tensor:
    """``pack_blocks(load_texts(source), tokenizer, seq_len)``, computed once and kept in ``cache_dir``.

    The key hashes the source (``source_fingerprint``), the tokenizer (``tokenizer_fingerprint``), ``seq_len``
    and ``max_chars``. Entries are safetensors files written to a temporary name and renamed into place, so an
    entry is complete or absent; an unreadable entry is recomputed.
    """
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(
        json.dumps(
            [
                _CACHE_FORMAT,
                source_fingerprint(source, domain=domain, base_dir=base_dir),
                tokenizer_fingerprint(tokenizer),
                int(seq_len),
                max_chars,
                *([text_field] if text_field not in (None, DEFAULT_TEXT_FIELD) else []),
            ]
        ).encode()
    ).hexdigest()[:32]
    cache_dir = Path(cache_dir)
    entry = cache_dir / f"blocks-{key}.safetensors"
    if entry.is_file():
        try:
            blocks = load_file(str(entry))["blocks"]
            if blocks.dim() == 2 and blocks.shape[1] == seq_len:
                return blocks
        except Exception:  # a damaged entry is a cache miss, not an error
            pass
    texts = load_texts(source, domain=domain, base_dir=base_dir, max_chars=max_chars, text_field=text_field)
    blocks = pack_blocks(texts, tokenizer, seq_len)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(entry) as tmp:
        save_file(
            {"blocks": blocks.contiguous()},
            tmp,
            metadata={"format": _CACHE_FORMAT, "source": source, "seq_len": str(seq_len)},
        )
    return blocks
