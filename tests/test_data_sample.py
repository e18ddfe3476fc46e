"""Data as it is published: compressed shards, other text columns, folders of many shards, bounded draws.

Real files written here, read by the real ``datasets`` streaming readers, tokenized by a real trained BPE;
the bounded-read tests measure the bytes this process reads (``/proc/self/io``), nothing is mocked.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
from pathlib import Path

import pytest
import torch

from commute_cli.errors import CommuteError
from commute_cli.io import data as dm
from commute_cli.io import documents, sampling

from tiny_run import make_tokenizer

_WORD_TEXT = (
    "the of and to in is was for on that with as by at from this are be or it an which "
    "river stone garden window winter summer letter market silver paper yellow"
)
WORDS = _WORD_TEXT.split()


def make_docs(n: int, seed: int, tag: str = "") -> list[str]:
    rng = random.Random(seed)
    return [
        (f"{tag} " if tag else "") + " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 40))) + "."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (vocab 400) with an EOS token, trained in well under a second."""
    return make_tokenizer(make_docs(400, 99) + ["shard 0123456789 doc"] * 20, None, vocab_size=400)


def _msg(err: pytest.ExceptionInfo) -> str:
    line = err.value.one_line()
    assert "\n" not in line
    return line


def jsonl_bytes(docs: list[str], field: str = "text", extra: bool = True) -> bytes:
    rows = []
    for i, d in enumerate(docs):
        row = {field: d}
        if extra:
            row.update({"timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"})
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    return "".join(rows).encode("utf-8")


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gz":
        return gzip.compress(data)
    if kind == "bz2":
        return bz2.compress(data)
    if kind == "xz":
        return lzma.compress(data)
    if kind == "zst":
        zstandard = pytest.importorskip("zstandard")
        return zstandard.ZstdCompressor().compress(data)
    if kind == "lz4":
        lz4_frame = pytest.importorskip("lz4.frame")
        return lz4_frame.compress(data)
    raise AssertionError(kind)


def rchar() -> int:
    """Bytes this process has read through read() calls so far (Linux), page cache or not."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


# --------------------------------------------------------------------------------- names and compressions


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("c4-train.00000-of-01024.json.gz", ("json", "gzip")),
        ("c4-ru.tfrecord-00000-of-01024.json.gz", ("json", "gzip")),
        ("c4-validation.00007-of-00008.json", ("json", None)),
        ("part.jsonl.zst", ("json", "zstd")),
        ("part.JSONL.ZSTD", ("json", "zstd")),
        ("x.ndjson.xz", ("json", "xz")),
        ("corpus.txt.bz2", ("text", "bz2")),
        ("t.csv.lz4", ("csv", "lz4")),
        ("train-00000-of-00002.parquet", ("parquet", None)),
        ("data-00000-of-00001.arrow", ("arrow", None)),
        ("x.parquet.gz", None),
        ("README.md", None),
        ("x.json.zip", None),
        ("x.gz", None),
    ],
)
def test_file_kind_by_last_two_suffixes(name, kind):
    assert dm.file_kind(Path(name)) == kind


@pytest.mark.parametrize("comp", ["gz", "bz2", "xz", "zst", "lz4"])
def test_every_compression_reads_like_the_plain_file(tmp_path, tokenizer, comp):
    docs = [*make_docs(60, 1), "Съешь же ещё этих мягких французских булок."]
    plain_jsonl = tmp_path / "d.jsonl"
    plain_jsonl.write_bytes(jsonl_bytes(docs))
    packed_jsonl = tmp_path / f"d.jsonl.{comp}"
    packed_jsonl.write_bytes(compress(jsonl_bytes(docs), comp))
    txt = "\n\n".join(docs).encode()
    (tmp_path / "d.txt").write_bytes(txt)
    (tmp_path / f"d.txt.{comp}").write_bytes(compress(txt, comp))
    csv = ("text,n\n" + "".join(f'"{d}",{i}\n' for i, d in enumerate(docs))).encode()
    (tmp_path / "d.csv").write_bytes(csv)
    (tmp_path / f"d.csv.{comp}").write_bytes(compress(csv, comp))
    for base in ("d.jsonl", "d.txt", "d.csv"):
        assert documents.load_texts(str(tmp_path / base)) == docs, base
        assert documents.load_texts(str(tmp_path / f"{base}.{comp}")) == docs, base
        a = sampling.sample_domain(str(tmp_path / base), tokenizer, 16, 12, seed=3)
        b = sampling.sample_domain(str(tmp_path / f"{base}.{comp}"), tokenizer, 16, 12, seed=3)
        assert torch.equal(a.blocks, b.blocks) and a.provenance["text_sha256"] == b.provenance["text_sha256"]


def test_c4_and_mc4_shard_folders(tmp_path, tokenizer):
    """The published layout: en/c4-train.NNNNN-of-MMMMM.json.gz and multilingual/c4-ru.tfrecord-...json.gz."""
    en, ru = tmp_path / "c4" / "en", tmp_path / "c4" / "multilingual"
    en.mkdir(parents=True)
    ru.mkdir(parents=True)
    for i in range(3):
        (en / f"c4-train.{i:05d}-of-01024.json.gz").write_bytes(
            gzip.compress(jsonl_bytes(make_docs(40, i, f"shard {i}")))
        )
        (ru / f"c4-ru.tfrecord-{i:05d}-of-01024.json.gz").write_bytes(
            gzip.compress(jsonl_bytes(make_docs(40, 10 + i, f"shard {i}")))
        )
    for folder in (en, ru):
        texts = documents.load_texts(str(folder))
        assert len(texts) == 120 and texts[0].startswith("shard 0") and texts[-1].startswith("shard 2")
        drawn = sampling.sample_domain(str(folder), tokenizer, 16, 24, seed=0)
        assert drawn.blocks.shape == (24, 16)
        assert drawn.provenance["shards_total"] == 3 and len(drawn.provenance["shards"]) == 3
        assert {s["name"] for s in drawn.provenance["shards"]} == {p.name for p in folder.iterdir()}


def test_missing_compression_package_is_one_line(tmp_path, monkeypatch):
    import fsspec.compression

    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd not really")
    monkeypatch.delitem(fsspec.compression.compr, "zstd", raising=False)
    with pytest.raises(CommuteError) as err:
        documents.load_texts(str(tmp_path / "a.jsonl.zst"))
    assert "zstandard" in _msg(err) and "pip install" in _msg(err)


# --------------------------------------------------------------------------------- the text column


def test_content_column_parquet_and_jsonl(tmp_path, tokenizer):
    """The Stack / StarCoder layout: the text is in `content`, next to hexsha, size, lang, ..."""
    import pandas as pd

    docs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(80)]
    frame = pd.DataFrame(
        {"hexsha": ["0" * 40] * 80, "size": [len(d) for d in docs], "lang": ["Python"] * 80, "content": docs}
    )
    frame.to_parquet(tmp_path / "code.parquet")
    frame.to_json(tmp_path / "code.jsonl", orient="records", lines=True)
    for name in ("code.parquet", "code.jsonl"):
        assert documents.load_texts(str(tmp_path / name), text_field="content") == docs
        drawn = sampling.sample_domain(str(tmp_path / name), tokenizer, 16, 12, seed=0, text_field="content")
        assert drawn.provenance["text_column"] == "content"
        with pytest.raises(CommuteError) as err:
            sampling.sample_domain(str(tmp_path / name), tokenizer, 16, 12, seed=0, domain="code")
        line = _msg(err)
        # one line that lists the columns and says how to name the right one
        assert "no 'text' column" in line and name in line
        assert all(c in line for c in ("hexsha", "size", "lang", "content"))
        assert "--text-field code=content" in line
    a = sampling.sample_domain(
        str(tmp_path / "code.parquet"), tokenizer, 16, 12, seed=0, text_field="content"
    )
    b = sampling.sample_domain(str(tmp_path / "code.jsonl"), tokenizer, 16, 12, seed=0, text_field="content")
    assert torch.equal(a.blocks, b.blocks)


def test_text_field_errors(tmp_path, tokenizer):
    (tmp_path / "d.jsonl").write_bytes(jsonl_bytes(["a b c"] * 5))
    with pytest.raises(CommuteError) as err:
        documents.load_texts(str(tmp_path / "d.jsonl"), text_field="body", domain="web")
    assert "no 'body' column" in _msg(err) and "url" in _msg(err) and "--text-field web=" in _msg(err)
    (tmp_path / "n.jsonl").write_text('{"text": "x", "n": 5}\n')
    with pytest.raises(CommuteError, match="not a string"):
        documents.load_texts(str(tmp_path / "n.jsonl"), text_field="n")
    (tmp_path / "p.txt").write_text("plain text\n")
    with pytest.raises(CommuteError, match="plain text"):
        documents.load_texts(str(tmp_path / "p.txt"), text_field="content")
    assert dm.parse_text_fields(["code=content", " web = raw_content "], ["en", "code", "web"]) == {
        "code": "content",
        "web": "raw_content",
    }
    for bad in (["content"], ["code="], ["=content"], ["zz=content"], ["code=a", "code=b"]):
        with pytest.raises(CommuteError):
            dm.parse_text_fields(bad, ["en", "code"])


# --------------------------------------------------------------------------------- the draw


def _shard_folder(root: Path, n_shards: int, docs_per_shard: int, nested: bool = False) -> Path:
    root.mkdir(parents=True)
    for i in range(n_shards):
        sub = root / f"part{i % 3}" if nested else root
        sub.mkdir(exist_ok=True)
        docs = make_docs(docs_per_shard, i, f"shard {i:04d}")
        (sub / f"train-{i:05d}-of-{n_shards:05d}.jsonl").write_bytes(jsonl_bytes(docs, extra=False))
    return root


def _shards_in(blocks: torch.Tensor, tokenizer) -> set[str]:
    import re

    text = tokenizer.decode(blocks.flatten().tolist())
    return set(re.findall(r"shard (\d{4})", text))


def test_draw_is_deterministic_spread_over_shards_and_shuffled(tmp_path, tokenizer):
    folder = _shard_folder(tmp_path / "many", 40, 30, nested=True)
    a = sampling.sample_domain(str(folder), tokenizer, 32, 48, seed=5)
    again = sampling.sample_domain(str(folder), tokenizer, 32, 48, seed=5)
    other = sampling.sample_domain(str(folder), tokenizer, 32, 48, seed=6)
    # the same sample at every call (every checkpoint of a run, and a resumed run)
    assert torch.equal(a.blocks, again.blocks) and a.provenance == again.provenance
    assert not torch.equal(a.blocks, other.blocks)
    # spread: MAX_SHARDS shards, each giving an equal share of the tokens, chosen by the seed
    read = a.provenance["shards"]
    assert len(read) == sampling.MAX_SHARDS == 16 and a.provenance["shards_total"] == 40
    share = -(-sampling.POOL_FACTOR * 48 * 32 // 16)
    assert all(s["tokens"] >= share for s in read[:-1]) and sum(s["tokens"] for s in read) >= 4 * 48 * 32
    assert {s["name"] for s in read} != {s["name"] for s in other.provenance["shards"]}
    names = sorted(s["name"] for s in read)
    assert names != [f"part{i % 3}/train-{i:05d}-of-00040.jsonl" for i in range(16)]  # not the first files
    assert len(_shards_in(a.blocks, tokenizer)) >= 16
    # the rows of a shard read are its first ones; nothing else of it is read
    assert all(1 <= s["rows_read"] <= 30 and s["documents"] == s["rows_read"] for s in read)
    # shuffled: the first third of the sample (one design part) already mixes many shards
    assert len(_shards_in(a.blocks[:16], tokenizer)) >= 4


def test_draw_fills_from_more_shards_when_shards_are_small(tmp_path, tokenizer):
    folder = _shard_folder(tmp_path / "small", 60, 1)  # one short document per shard
    drawn = sampling.sample_domain(str(folder), tokenizer, 16, 40, seed=0)
    read = drawn.provenance["shards"]
    assert len(read) > sampling.MAX_SHARDS and all(s["documents"] == 1 for s in read)
    assert drawn.blocks.shape == (40, 16)
    with pytest.raises(CommuteError) as err:
        sampling.sample_domain(str(folder), tokenizer, 16, 4000, seed=0, domain="en")
    assert "domain en has" in _msg(err) and "fewer than the 4000 blocks" in _msg(err)


def test_draw_equals_the_plain_packing_of_the_documents_it_records(tmp_path, tokenizer):
    """Reference: one shard, so the pool is the first POOL_FACTOR*n*T tokens of pack_blocks(documents)."""
    docs = make_docs(100, 7)
    (tmp_path / "d.jsonl").write_bytes(jsonl_bytes(docs))
    drawn = sampling.sample_domain(str(tmp_path / "d.jsonl"), tokenizer, 16, 30, seed=11)
    n_pool = sampling.POOL_FACTOR * 30
    reference = sampling.pack_blocks(docs, tokenizer, 16)
    assert reference.shape[0] > n_pool  # the file is larger than the pool: only its start is read
    gen = torch.Generator().manual_seed(11)
    torch.randperm(1, generator=gen)  # the shard permutation comes first
    chosen = torch.randperm(n_pool, generator=gen)[:30]
    assert torch.equal(drawn.blocks, reference[chosen])
    assert drawn.provenance["blocks"] == chosen.tolist() and drawn.provenance["pool_blocks"] == n_pool
    used = drawn.provenance["documents"]
    assert drawn.provenance["shards"][0]["rows_read"] == used < len(docs)
    # a file smaller than the pool is sampled over its whole length
    small = sampling.sample_domain(str(tmp_path / "d.jsonl"), tokenizer, 16, 60, seed=11)
    assert (
        small.provenance["documents"] == len(docs) and small.provenance["pool_blocks"] == reference.shape[0]
    )
    assert max(small.provenance["blocks"]) > 0.8 * reference.shape[0]


def test_save_to_disk_and_parquet_shards_use_the_same_draw(tmp_path, tokenizer):
    import datasets
    import pandas as pd

    docs = make_docs(200, 3)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    drawn = sampling.sample_domain(str(tmp_path / "saved"), tokenizer, 16, 24, seed=1)
    assert drawn.provenance["kind"] == "saved" and drawn.provenance["shards_total"] == documents.SAVED_SHARDS
    assert len(drawn.provenance["shards"]) >= sampling.MAX_SHARDS  # 3 rows per shard: more fill in
    (tmp_path / "pq").mkdir()
    for i in range(4):
        pd.DataFrame({"text": docs[i * 50 : (i + 1) * 50]}).to_parquet(tmp_path / "pq" / f"{i}.parquet")
    drawn = sampling.sample_domain(str(tmp_path / "pq"), tokenizer, 16, 24, seed=1)
    assert drawn.provenance["shards_total"] == 4 and len(drawn.provenance["shards"]) == 4


# --------------------------------------------------------------------------------- bounded reads, measured


def _big_jsonl(path: Path, mb: int) -> Path:
    docs = make_docs(400, 1)
    block = jsonl_bytes(docs)
    with path.open("wb") as fh:
        for _ in range(mb * 1_000_000 // len(block) + 1):
            fh.write(block)
    return path


def test_bounded_reads_many_shards_and_one_big_file(tmp_path, tokenizer):
    """Bytes read (``rchar``) to draw 32 blocks of 64 tokens: the same for 4 shards of 0.2 MB as for 48
    shards of 1.5 MB (72 MB), and for a 40 MB file as for a 1 MB file."""
    small = _shard_folder(tmp_path / "small", 4, 300)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(48):
        _big_jsonl(big / f"shard-{i:03d}.jsonl", 2)
    sampling.sample_domain(str(small), tokenizer, 64, 32, seed=0)  # imports and first-call setup

    def cost(source: Path) -> tuple[int, sampling.DomainSample]:
        before = rchar()
        drawn = sampling.sample_domain(str(source), tokenizer, 64, 32, seed=0)
        return rchar() - before, drawn

    read_small, _ = cost(small)
    read_big, drawn = cost(big)
    total = sum(f.stat().st_size for f in big.iterdir())
    assert total > 90_000_000
    # at most MAX_SHARDS shards opened, one reader chunk each (plus the first file's schema probe)
    assert read_big < (sampling.MAX_SHARDS + 2) * (documents.READ_CHUNK_BYTES + 200_000) < total / 4
    assert len(drawn.provenance["shards"]) >= sampling.MAX_SHARDS  # 3 rows per shard: more fill in
    assert sum(s["rows_read"] for s in drawn.provenance["shards"]) < 400
    assert read_small < 3 * documents.READ_CHUNK_BYTES
    one_small = _big_jsonl(tmp_path / "one_small.jsonl", 1)
    one_big = _big_jsonl(tmp_path / "one_big.jsonl", 40)
    read_one_small, _ = cost(one_small)
    read_one_big, _ = cost(one_big)
    assert read_one_big < read_one_small + 300_000 and read_one_big < 3 * documents.READ_CHUNK_BYTES


def test_sentence_per_line_txt_is_not_one_giant_document(tmp_path, tokenizer):
    """A Leipzig/OPUS-style file: one sentence per line, no blank lines, 3 MB."""
    path = tmp_path / "sentences.txt"
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as fh:
        while fh.tell() < 3_000_000:
            fh.write(" ".join(rng.choice(WORDS) for _ in range(12)) + ".\n")
    texts = documents.load_texts(str(path))
    assert len(texts) >= 3 and max(len(t) for t in texts) < documents.MAX_DOC_CHARS + 200
    assert sum(len(t) + 1 for t in texts) == path.stat().st_size
    before = rchar()
    drawn = sampling.sample_domain(str(path), tokenizer, 32, 24, seed=0)
    assert rchar() - before < 3 * documents.READ_CHUNK_BYTES
    assert drawn.provenance["documents"] == 1 and drawn.provenance["characters"] < 100_000


# --------------------------------------------------------------------------------- the tokenizer guard


def _empty_tokenizer_of_a_checkpoint_without_tokenizer_files(folder: Path):
    """What AutoTokenizer builds from an HF checkpoint saved without tokenizer files (case bh02)."""
    from transformers import AutoTokenizer, GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _unk_only_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_tokenizer_mapping_the_data_to_nothing_is_refused(tmp_path, tokenizer):
    path = _big_jsonl(tmp_path / "d.jsonl", 20)
    try:
        empty = _empty_tokenizer_of_a_checkpoint_without_tokenizer_files(tmp_path / "ckpt")
    except Exception:  # a transformers that refuses to build it is fine: then there is nothing to guard
        empty = None
    cases = [t for t in (empty, _unk_only_tokenizer()) if t is not None]
    for bad in cases:
        before = rchar()
        with pytest.raises(CommuteError) as err:
            sampling.sample_domain(str(path), bad, 8, 6, seed=0, domain="en")
        line = _msg(err)
        assert "almost nothing" in line and "domain en" in line and "--tokenizer" in line
        # refused after a bounded read, not after reading the 20 MB
        assert rchar() - before < 3 * documents.READ_CHUNK_BYTES
        with pytest.raises(CommuteError, match="almost nothing"):
            sampling.pack_blocks(make_docs(50, 0), bad, 8)
    # the real tokenizer passes, with a tokens-per-character rate far above the threshold
    drawn = sampling.sample_domain(str(path), tokenizer, 8, 6, seed=0)
    assert drawn.provenance["tokens_per_character"] > 10 * sampling.MIN_TOKENS_PER_CHAR
    # a character-level view of the threshold: one token per 50 characters is refused, per 40 is not
    sampling.check_tokenizer_output(1000 // 40, 1000, "x")
    with pytest.raises(CommuteError):
        sampling.check_tokenizer_output(1000 // 60, 1000, "x")


# --------------------------------------------------------------------------------- hub sources


def test_hub_sources_take_the_same_draw_and_fail_fast_offline(monkeypatch, tmp_path, tokenizer):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert dm.is_hub_source("allenai/c4") and dm.is_hub_source("mc4") and dm.is_hub_source("o/n:cfg")
    assert not dm.is_hub_source("data/en.json.gz") and not dm.is_hub_source("shards/x.jsonl.zst")
    for source, domain in (("c4", "en"), ("mc4", "ru"), ("someone/corpus:sub", "x")):
        start = time.monotonic()
        with pytest.raises(CommuteError) as err:
            sampling.sample_domain(source, tokenizer, 16, 12, seed=0, domain=domain)
        assert time.monotonic() - start < 3.0
        assert "can't reach" in _msg(err) and "offline" in _msg(err)
