"""A tiny but real training run for analysis tests: two synthetic 'languages', a byte-level BPE tokenizer
trained with `tokenizers`, a GPT-2 from a small config, and checkpoints in the HF Trainer layout.

The two domains are generated text with different letter statistics, so their gradients differ and the
bracket is not zero. Everything is made in the test's temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

EN_WORDS = "the of and to in is was for on that with as by at from this are be or it an which".split()  # noqa: SIM905 (reads as text)
XX_WORDS = "zyx qok vuz jaq xiv kuz zob qiv wux jyz vok zaq xob quv jiz kyx wob zuv qax".split()  # noqa: SIM905
# two more 'languages' for runs with K = 4 domains (make_run(weights=...) with these names)
YY_WORDS = "mala peto sina kuro lemi tanu pori vesa mino rulo kapi seno tiva lora".split()  # noqa: SIM905
ZZ_WORDS = "0 1 2 3 4 5 6 7 8 9 + - = ( ) * / < >".split()  # noqa: SIM905
WORDS = {"en": EN_WORDS, "xx": XX_WORDS, "yy": YY_WORDS, "zz": ZZ_WORDS}


def make_texts(words: list[str], n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(n_docs)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    return path


def make_tokenizer(texts: list[str], folder: Path | None, vocab_size: int = 300):
    """A byte-level BPE with ``<|endoftext|>`` as eos (and bos), trained in well under a second; saved to
    ``folder`` unless it is None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


def tiny_config(vocab_size: int, n_positions: int = 32, n_embd: int = 16, n_layer: int = 1):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )


def save_checkpoint(model, folder: Path, step: int, lr: float, tokenizer=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    state = {"global_step": step, "log_history": [{"step": step, "learning_rate": lr, "loss": 0.0}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def make_run(
    root: Path,
    steps: tuple[int, ...] = (0, 20, 40),
    lr: float = 0.05,
    seq_len: int = 16,
    seed: int = 0,
    n_docs: int = 300,
    weights: dict[str, float] | None = None,
) -> Path:
    """A run folder with checkpoint-N/ for each step, data/{en,xx}.jsonl, tokenizer/ and commute.json.

    Training between checkpoints is plain SGD on the weighted mixture (full batches of packed blocks).
    ``weights`` names the domains (default en 0.7, xx 0.3); any of :data:`WORDS` (en, xx, yy, zz: K up to 4).
    """
    from transformers import GPT2LMHeadModel

    from commute_cli.io.sampling import pack_blocks

    weights = weights or {"en": 0.7, "xx": 0.3}
    root.mkdir(parents=True, exist_ok=True)
    texts = {name: make_texts(WORDS[name], n_docs, seed + k) for k, name in enumerate(weights)}
    for name, docs in texts.items():
        write_jsonl(root / "data" / f"{name}.jsonl", docs)
    tok = make_tokenizer([t for docs in texts.values() for t in docs], root / "tokenizer")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_config(len(tok), n_positions=max(32, seq_len))).eval()
    blocks = {name: pack_blocks(docs, tok, seq_len) for name, docs in texts.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for target_step in steps:
        while step < target_step:
            opt.zero_grad()
            loss = 0.0
            for name, w in weights.items():
                idx = torch.randint(0, blocks[name].shape[0], (16,), generator=gen)
                x = blocks[name][idx]
                loss = loss + w * model(x, labels=x).loss
            loss.backward()
            opt.step()
            step += 1
        save_checkpoint(model, root / f"checkpoint-{step}", step, lr)
    manifest = {
        "format": "commute-manifest/1",
        "domains": {name: f"data/{name}.jsonl" for name in weights},
        "schedule": [{"step": 0, "weights": weights}],
        "tokenizer": "tokenizer",
        "seq_len": seq_len,
        "optimizer": {"name": "sgd", "lr": lr},
        "lr_schedule": "constant",
        "batch_size": 16,
        "seed": seed,
    }
    (root / "commute.json").write_text(json.dumps(manifest, indent=2))
    return root


# ------------------------------------------------------------------------------------------------ full-pool
# Exact references on a whole pool of blocks (no sampling), written directly on the model and independent of
# commute_cli.curvature: what real full-batch gradient descent optimises.

POOL_CHUNK = 256  # blocks per forward pass (keeps float64 activations small)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a block batch, in the model's dtype (float64 in reference tests)."""
    import torch.nn.functional as F

    logits = model(ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def pool_loss(model, pool: torch.Tensor) -> float:
    """Mean loss over every block of ``pool``."""
    with torch.no_grad():
        return float(sum(lm_loss(model, x) * x.shape[0] for x in pool.split(POOL_CHUNK)) / pool.shape[0])


def pool_grad(model, pool: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of the pool-mean loss (list over ``model.parameters()``, tied weights once)."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for x in pool.split(POOL_CHUNK):
        g = torch.autograd.grad(lm_loss(model, x) * (x.shape[0] / pool.shape[0]), params)
        for t, gi in zip(total, g, strict=True):
            t.add_(gi)
    return total


def sample_shards(root: Path, train_chars: int, validation_chars: int, doc_chars: int) -> Path:
    """``root/{en,ru}/{train,validation}.jsonl``: the first documents of the shipped shards (each cut to
    ``doc_chars``) until each file holds the given number of characters. Returns ``root``."""
    samples = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "data"
    for lang in ("en", "ru"):
        for split, limit in (("train", train_chars), ("validation", validation_chars)):
            lines, total = [], 0
            with (samples / lang / f"{split}.jsonl").open(encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"][:doc_chars]
                    lines.append(json.dumps({"text": text}, ensure_ascii=False))
                    total += len(text)
                    if total >= limit:
                        break
            (root / lang).mkdir(parents=True, exist_ok=True)
            (root / lang / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def analyze_like_transformers_copy(tmp_path: Path, capsys, foreign: Path, steps: dict[int, Path], lr: float):
    """Analyze a foreign-format run (``foreign``: its folder) and the same weights saved by
    ``save_pretrained`` as Trainer-like ``checkpoint-N`` folders (``steps``: step -> the foreign checkpoint,
    loaded by commute's one loader), on ``tmp_path``'s ``en.jsonl``/``xx.jsonl`` and ``tok``; returns both
    results.csv (without ``run_id``) and the common analyze arguments. Asserts both commands exit 0."""
    import pandas as pd

    from commute_cli.io import checkpoints

    from cli_runner import cli

    for step, folder in steps.items():
        hf = tmp_path / "hf" / f"checkpoint-{step}"
        checkpoints.load_model(folder).save_pretrained(hf)
        (hf / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "log_history": [{"step": step, "learning_rate": lr}]})
        )
    common = [
        "--domains", f"en={tmp_path / 'en.jsonl'}", f"xx={tmp_path / 'xx.jsonl'}", "--weights", "en=0.6",
        "xx=0.4", "--tokenizer", tmp_path / "tok", "--samples", "12", "--blocks", "2", "--seq-len", "16",
        "--target", "mix", "-q",
    ]  # fmt: skip
    for folder, out in ((foreign, "o1"), (tmp_path / "hf", "o2")):
        code, _, err = cli(["analyze", folder, "--out", tmp_path / out, *common], capsys)
        assert code == 0, err
    a, b = (pd.read_csv(tmp_path / o / "results.csv").drop(columns="run_id") for o in ("o1", "o2"))
    return a, b, common
