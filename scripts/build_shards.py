#!/usr/bin/env python3
"""Build the sample data shards and the tokenizer shipped in ``sample_checkpoints/``.

Why this source: no dataset hub can be reached here, but the Debian package archive can, and the
LibreOffice help packages hold real, human-written prose under a permissive licence (MPL-2.0) in many
languages with the same page layout. English and Russian give two domains that share a topic but differ
in script, which is what the bilingual 0.8/0.2 experiment of MATH.md needs.

Steps (deterministic: the same package versions give byte-identical shards and tokenizer):

1. ``apt-get download libreoffice-help-en-us libreoffice-help-ru`` and ``dpkg -x`` into a temporary
   folder (nothing is installed).
2. Parse every help page ``usr/share/libreoffice/help/<lang>/text/**.html`` with the standard library's
   ``html.parser``: keep the text of the page body (``div#DisplayArea``), one line per block element;
   drop scripts, code listings, "how to get there" menu paths and related-topic lists; of the
   platform-switched spans (``hidden`` MAC/WIN/WRITER/... variants) keep the default one.
3. Drop boilerplate: a line that occurs on ``--boilerplate-pages`` or more pages of a language is
   navigation or a shared snippet, not page content.
4. Russian: the help is only partly translated, so keep only lines whose letters are at least 60%
   Cyrillic. English: keep lines whose letters are at least 90% Latin.
5. A document is one page (its kept lines joined by newlines). Pages go to validation or train by a
   SHA-256 hash of the page path (the same for both languages, so validation topics are held out in
   both), and are taken in hash order until each shard has its character budget.
6. Train a byte-level BPE (``tokenizers``) on the train shards of all domains and save it as a
   ``PreTrainedTokenizerFast`` so that ``AutoTokenizer.from_pretrained`` loads it offline.

Usage::

    python scripts/build_shards.py                       # writes sample_checkpoints/data and /tokenizer
    python scripts/build_shards.py --extracted /tmp/x    # reuse an already extracted tree (offline)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"en": "libreoffice-help-en-us", "ru": "libreoffice-help-ru"}
HELP_LANG_DIR = {"en": "en-US", "ru": "ru"}
EOS = "<|endoftext|>"

# Elements whose text is not prose (or not shown): skipped with everything inside them.
_SKIP_TAGS = {"script", "style", "noscript", "pre", "code", "head", "title", "button", "nav", "label"}
_SKIP_CLASSES = {"relatedtopics", "howtoget", "bascode", "pycode", "code", "debug", "iconcell", "noteicon"}
# Elements that end a line of text.
_BLOCK_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "th", "tr", "div", "br", "pre", "table"}
# Elements without an end tag: they never open a nesting level.
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class HelpPageParser(HTMLParser):
    """Collect the visible prose of one LibreOffice help page as a list of lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._buf: list[str] = []
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, opens DisplayArea, skipped)
        self._in_body = 0  # > 0 inside div#DisplayArea
        self._skip = 0  # > 0 inside a skipped element

    def _flush(self) -> None:
        text = " ".join("".join(self._buf).split())
        self._buf.clear()
        if text:
            self.lines.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _VOID_TAGS:
            return
        body = tag == "div" and a.get("id") == "DisplayArea"
        hidden = "hidden" in a and not a.get("id", "").startswith("default")
        skipped = tag in _SKIP_TAGS or hidden or bool(set(a.get("class", "").split()) & _SKIP_CLASSES)
        self._stack.append((tag, body, skipped))
        self._in_body += body
        self._skip += skipped

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _VOID_TAGS or not any(t == tag for t, _, _ in self._stack):
            return  # stray end tag: ignore
        while self._stack:  # close implicitly unclosed children too (e.g. <p> inside <li>)
            t, body, skipped = self._stack.pop()
            self._in_body -= body
            self._skip -= skipped
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._in_body > 0 and self._skip == 0:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def page_lines(path: Path) -> list[str]:
    parser = HelpPageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.lines


def script_fraction(text: str, script: str) -> float:
    """Fraction of the letters in ``text`` whose Unicode name starts with ``script`` (e.g. 'CYRILLIC')."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    hits = sum(1 for ch in letters if unicodedata.name(ch, "").startswith(script))
    return hits / len(letters)


_SCRIPT = {"en": ("LATIN", 0.9), "ru": ("CYRILLIC", 0.6)}
_MIN_LINE_LETTERS = 3


def keep_line(line: str, lang: str) -> bool:
    script, threshold = _SCRIPT[lang]
    if sum(ch.isalpha() for ch in line) < _MIN_LINE_LETTERS:
        return False
    return script_fraction(line, script) >= threshold


def page_hash(rel_path: str) -> int:
    return int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")


def build_domain(
    lang_root: Path,
    lang: str,
    *,
    train_chars: int,
    validation_chars: int,
    validation_fraction: float,
    boilerplate_pages: int,
    min_doc_chars: int,
) -> tuple[list[str], list[str], dict[str, int]]:
    """Return (train docs, validation docs, stats) for one language's help tree."""
    pages = sorted(lang_root.glob("text/**/*.html"))
    if not pages:
        raise SystemExit(f"no help pages under {lang_root}/text: package layout changed?")
    lines_by_page = {p.relative_to(lang_root).as_posix(): page_lines(p) for p in pages}
    # Boilerplate: count each distinct line once per page.
    df = Counter(line for lines in lines_by_page.values() for line in set(lines))
    boiler = {line for line, n in df.items() if n >= boilerplate_pages}
    docs: list[tuple[int, str, str]] = []
    n_lines = n_kept = 0
    for rel, lines in lines_by_page.items():
        kept: list[str] = []
        for line in lines:
            n_lines += 1
            if line in boiler or not keep_line(line, lang):
                continue
            if kept and kept[-1] == line:
                continue
            kept.append(line)
        n_kept += len(kept)
        text = "\n".join(kept)
        if len(text) >= min_doc_chars:
            docs.append((page_hash(rel), rel, text))
    docs.sort()
    cut = int(validation_fraction * 2**64)
    train, validation = [], []
    n_train = n_val = 0
    for h, _rel, text in docs:
        if h < cut:
            if n_val < validation_chars:
                validation.append(text)
                n_val += len(text)
        elif n_train < train_chars:
            train.append(text)
            n_train += len(text)
    stats = {
        "pages": len(pages),
        "lines": n_lines,
        "boilerplate_lines": len(boiler),
        "kept_lines": n_kept,
        "documents": len(docs),
        "available_chars": sum(len(t) for _, _, t in docs),
        "train_docs": len(train),
        "train_chars": n_train,
        "validation_docs": len(validation),
        "validation_chars": n_val,
    }
    return train, validation, stats


def write_jsonl(path: Path, texts: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def fetch(workdir: Path) -> tuple[Path, dict[str, str]]:
    """Download the help packages with apt-get and unpack them with dpkg -x; return (root, versions)."""
    versions: dict[str, str] = {}
    root = workdir / "extracted"
    root.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES.values():
        subprocess.run(["apt-get", "download", "-q", pkg], cwd=workdir, check=True)
    for deb in sorted(workdir.glob("*.deb")):
        out = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True)
        fields = dict(ln.split(": ", 1) for ln in out.stdout.decode().strip().splitlines())
        versions[fields["Package"]] = fields["Version"]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root, versions


MPL_TEXT = Path("/usr/share/common-licenses/MPL-2.0")


def copy_licences(root: Path, data: Path) -> None:
    """Ship the packages' copyright file and, where the system has it, the full MPL-2.0 text."""
    copyright_file = root / "usr/share/doc" / PACKAGES["en"] / "copyright"
    if copyright_file.is_file():
        shutil.copyfile(copyright_file, data / "COPYRIGHT-libreoffice-help.txt")
    if MPL_TEXT.is_file():
        shutil.copyfile(MPL_TEXT, data / "LICENSE-MPL-2.0.txt")
    else:
        print(f"warning: {MPL_TEXT} not found; PROVENANCE.md points to the licence's URL", file=sys.stderr)


def train_tokenizer(files: list[Path], out_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE (GPT-2 style) on the train shards, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        for f in files:
            yield from read_jsonl(f)

    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, clean_up_tokenization_spaces=False
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes its own class name ("TokenizersBackend"); the 4.x name loads in both.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def chars_per_token(tokenizer_dir: Path, path: Path) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    texts = list(read_jsonl(path))
    n_tok = sum(len(ids) for ids in tok(texts)["input_ids"])
    return sum(len(t) for t in texts) / n_tok


PROVENANCE = """\
# Provenance and licence of the sample data

The shards in this folder are text extracted from the LibreOffice help, as packaged by Debian:

| domain | package | version | licence |
|---|---|---|---|
{rows}

Copyright 2000, 2010 Oracle and/or its affiliates; copyright (c) 2000, 2010 LibreOffice contributors
and/or their affiliates. The help content is licensed under the **Mozilla Public License, version 2.0**
(MPL-2.0); some files incorporate Apache-2.0 licensed material. The packages' copyright file is
`COPYRIGHT-libreoffice-help.txt` and the full MPL-2.0 text `LICENSE-MPL-2.0.txt`, both in this folder
(also at https://mozilla.org/MPL/2.0/). This is a derived form of the covered files
(HTML markup removed, boilerplate and untranslated lines dropped); the source form is available from the
Debian archive (`apt-get source libreoffice`) and from https://opengrok.libreoffice.org/xref/help/.

The tokenizer in `../tokenizer/` was trained on the train shards below; the checkpoints were trained on
them. Both are derived works of the same text.

## How it was built

    python scripts/build_shards.py

(`scripts/build_shards.py` in the commute repository: `apt-get download` + `dpkg -x`, then the
standard library's HTML parser over `usr/share/libreoffice/help/<lang>/text/**.html`.) Per page, the
visible text of the page body is kept, one line per block element; scripts, code listings, menu-path
boxes and related-topic lists are dropped; of platform-switched spans the default one is kept. A line
that occurs on {boilerplate} or more pages of a language is dropped as boilerplate. Russian lines are kept
only if at least 60% of their letters are Cyrillic (the Russian help is only partly translated); English
lines only if at least 90% of their letters are Latin. One page is one document (a JSON line with a
`text` field). A page goes to validation if the first 8 bytes of SHA-256 of its path (for example
`text/shared/guide/active_help_on_off.html`), read as a big-endian integer, fall below
{vfrac} of 2^64, the same rule for both languages; pages are taken in hash order until each shard has its
character budget ({train_chars} characters train, {val_chars} validation).

## Shards

| file | documents | characters | bytes |
|---|---|---|---|
{shard_rows}

## Extraction statistics

| domain | pages | lines | boilerplate lines | kept lines | documents | characters available |
|---|---|---|---|---|---|---|
{stat_rows}

## Tokenizer

Byte-level BPE (`tokenizers`, GPT-2 style pre-tokenizer, no prefix space), vocabulary {vocab}, trained on
both train shards; `<|endoftext|>` is the only special token (bos, eos and unk). Characters per token
on the validation shards: {cpt}.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "sample_checkpoints", help="sample_checkpoints folder")
    ap.add_argument("--extracted", type=Path, help="an already extracted tree (skips apt-get download)")
    ap.add_argument("--versions", help='with --extracted: JSON {"package": "version"} for the provenance')
    ap.add_argument("--train-chars", type=int, default=1_000_000)
    ap.add_argument("--validation-chars", type=int, default=100_000)
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    ap.add_argument("--boilerplate-pages", type=int, default=8)
    ap.add_argument("--min-doc-chars", type=int, default=200)
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="commute-shards-") as tmp:
        if args.extracted:
            root, versions = args.extracted, json.loads(args.versions or "{}")
        else:
            root, versions = fetch(Path(tmp))
        help_root = root / "usr/share/libreoffice/help"
        data = args.out / "data"
        stats: dict[str, dict[str, int]] = {}
        shards: dict[str, dict[str, Path]] = {}
        for lang in PACKAGES:
            train, val, stats[lang] = build_domain(
                help_root / HELP_LANG_DIR[lang],
                lang,
                train_chars=args.train_chars,
                validation_chars=args.validation_chars,
                validation_fraction=args.validation_fraction,
                boilerplate_pages=args.boilerplate_pages,
                min_doc_chars=args.min_doc_chars,
            )
            shards[lang] = {
                "train": data / lang / "train.jsonl",
                "validation": data / lang / "validation.jsonl",
            }
            write_jsonl(shards[lang]["train"], train)
            write_jsonl(shards[lang]["validation"], val)
            print(f"{lang}: {json.dumps(stats[lang])}", file=sys.stderr)
        copy_licences(root, data)

    tok_dir = args.out / "tokenizer"
    train_tokenizer([shards[lang]["train"] for lang in PACKAGES], tok_dir, args.vocab_size)
    cpt = {lang: chars_per_token(tok_dir, shards[lang]["validation"]) for lang in PACKAGES}
    print(f"chars/token on validation: {cpt}", file=sys.stderr)

    def shard_row(path: Path) -> str:
        texts = list(read_jsonl(path))
        rel = path.relative_to(data).as_posix()
        return f"| `{rel}` | {len(texts)} | {sum(map(len, texts)):,} | {path.stat().st_size:,} |"

    text = PROVENANCE.format(
        rows="\n".join(
            f"| {lang} | `{pkg}` | {versions.get(pkg, 'unknown')} | MPL-2.0 |"
            for lang, pkg in PACKAGES.items()
        ),
        boilerplate=args.boilerplate_pages,
        vfrac=args.validation_fraction,
        train_chars=f"{args.train_chars:,}",
        val_chars=f"{args.validation_chars:,}",
        shard_rows="\n".join(
            shard_row(shards[lang][s]) for lang in PACKAGES for s in ("train", "validation")
        ),
        stat_rows="\n".join(
            f"| {lang} | {s['pages']} | {s['lines']} | {s['boilerplate_lines']} | {s['kept_lines']} "
            f"| {s['documents']} | {s['available_chars']:,} |"
            for lang, s in stats.items()
        ),
        vocab=args.vocab_size,
        cpt=", ".join(f"{lang} {v:.2f}" for lang, v in cpt.items()),
    )
    (data / "PROVENANCE.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
