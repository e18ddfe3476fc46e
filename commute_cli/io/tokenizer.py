"""Load the tokenizer a model was trained with, from local files only, and refuse one that cannot be it.

A folder without tokenizer files is refused (there ``AutoTokenizer`` would build an empty tokenizer from
``config.json`` alone, and every text would become end-of-text ids only); so is any tokenizer that maps a
plain sentence to no ordinary tokens, or has more ids than the model has embedding rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from commute_cli.errors import CommuteError

VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
    "sentencepiece.bpe.model",
)
"""Files that hold a vocabulary: a folder with one of them (or any ``*.model``) has a tokenizer."""
TOKENIZER_FILES = (
    *VOCABULARY_FILES,
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
"""Every file of a tokenizer (never model weights): what travels when a tokenizer is copied with a
checkpoint (``io.runfiles.copy_tokenizer_files``)."""

_PROBE = "The quick brown fox jumps over the lazy dog; 0123456789."


def has_tokenizer(folder: Path | str) -> bool:
    """The one check of whether a folder holds a tokenizer: a vocabulary file (:data:`VOCABULARY_FILES`, or
    any ``*.model``). A ``tokenizer_config.json`` alone is not one: :func:`load_tokenizer` refuses it."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in VOCABULARY_FILES) or any(folder.glob("*.model"))


def tokenizer_files(folder: Path | str) -> list[Path]:
    """The tokenizer files of ``folder`` (:data:`TOKENIZER_FILES` and any ``*.model``), as they are there."""
    folder = Path(folder)
    names = dict.fromkeys([*TOKENIZER_FILES, *sorted(p.name for p in folder.glob("*.model"))])
    return [folder / name for name in names if (folder / name).is_file()]


def load_tokenizer(path: Path | str):
    """A tokenizer from a local folder (``AutoTokenizer``), a ``tokenizer.json`` file, or a name already in
    the local Hugging Face cache (``gpt2``); never remote code, never the network.

    A folder without tokenizer files (``tokenizer.json``, ``vocab.json``, ``tokenizer.model``, ...) is
    refused: there AutoTokenizer would build an empty tokenizer from ``config.json`` alone that maps every
    text to no tokens. The tokenizer must also pass :func:`check_tokenizer_encodes`. Raises CommuteError.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path).expanduser()
    if path.is_file() and path.suffix in (".pt", ".pth"):
        raise CommuteError(
            f"{path} is a checkpoint, not a tokenizer: nanoGPT checkpoints carry none",
            hint="pass --tokenizer with the tokenizer the model was trained with (a folder, tokenizer.json,"
            " or gpt2 if it is in your Hugging Face cache)",
        )
    if path.is_dir() and not has_tokenizer(path):
        raise CommuteError(
            f"{path} has no tokenizer files (no {', '.join(VOCABULARY_FILES[:3])}; a Trainer built without a "
            "tokenizer saves none)",
            hint="pass --tokenizer PATH with the tokenizer the model was trained with",
        )
    tokenizer: Any
    try:
        if path.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif path.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
        else:
            tokenizer = _cached_tokenizer(str(path))
    except CommuteError:
        raise
    except Exception as err:
        raise CommuteError(
            f"could not load a tokenizer from {path}: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}",
            hint="the folder needs tokenizer.json or tokenizer_config.json with its vocabulary files",
        ) from err
    check_tokenizer_encodes(tokenizer, str(path))
    return tokenizer


def _cached_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CommuteError(
            f"tokenizer path {name} does not exist", hint="pass a tokenizer folder or tokenizer.json"
        )
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise CommuteError(
            f"tokenizer {name!r} is neither a local path nor in the local Hugging Face cache",
            hint="pass a tokenizer folder or tokenizer.json",
        ) from err


def check_tokenizer_encodes(tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer that maps ordinary text to no ordinary tokens (an empty or broken vocabulary)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if len(tokenizer) <= len(special) + 1 or not [i for i in ids if i not in special]:
        raise CommuteError(
            f"the tokenizer from {where} has {len(tokenizer)} tokens and maps text to no ordinary tokens",
            hint="pass --tokenizer with the tokenizer the model was trained with",
        )


def check_tokenizer(tokenizer: Any, model_config: Any) -> None:
    """The tokenizer's ids must all be rows of the model's embedding: ``len(tokenizer) <= vocab_size``."""
    vocab = model_config.get("vocab_size") if isinstance(model_config, Mapping) else model_config.vocab_size
    size = len(tokenizer)
    if vocab is None or size > int(vocab):
        raise CommuteError(
            f"the tokenizer has {size} tokens but the model's vocabulary has {vocab}",
            hint="use the tokenizer the model was trained with",
        )
