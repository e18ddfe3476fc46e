"""domains.py on real files of every supported format, a real trained BPE tokenizer and the real datasets."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from commute_cli.errors import CommuteError
from commute_cli.io import data as dm
from commute_cli.io import documents, sampling

from tiny_run import make_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "How vexingly quick daft zebras jump!",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A throwaway byte-level BPE (vocab 300) with an EOS token, trained in well under a second."""
    return make_tokenizer(DOCS * 20, None, vocab_size=300)


# --------------------------------------------------------------------------------- specs


def test_parse_domain_specs():
    assert dm.parse_domain_specs(["en=data/en.jsonl", "ru = mc4", "code.py-3_x=a=b"]) == {
        "en": "data/en.jsonl",
        "ru": "mc4",
        "code.py-3_x": "a=b",
    }


@pytest.mark.parametrize("specs", [["en"], ["=x"], ["en="], ["en=a", "en=b"], ["e n=x"], ["en/x=y"], ["ü=x"]])
def test_parse_domain_specs_rejects(specs):
    with pytest.raises(CommuteError):
        dm.parse_domain_specs(specs)


# --------------------------------------------------------------------------------- formats


def _write_all_formats(root: Path) -> dict[str, Path]:
    import datasets
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    out["jsonl"] = root / "d.jsonl"
    out["jsonl"].write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS)))
    out["json"] = root / "d.json"
    out["json"].write_text(json.dumps([{"text": t} for t in DOCS], ensure_ascii=False))
    out["txt"] = root / "d.txt"
    out["txt"].write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    out["parquet"] = root / "d.parquet"
    pd.DataFrame({"text": DOCS, "n": range(len(DOCS))}).to_parquet(out["parquet"])
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    out["save_to_disk"] = root / "saved"
    ds.save_to_disk(str(out["save_to_disk"]))
    out["arrow"] = root / "d.arrow"
    shutil.copy(next(out["save_to_disk"].glob("*.arrow")), out["arrow"])
    out["dataset_dict"] = root / "saved_dict"
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(out["dataset_dict"]))
    out["folder"] = root / "shards"
    (out["folder"] / "sub").mkdir(parents=True)
    (out["folder"] / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:2]))
    (out["folder"] / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[2:]))
    (out["folder"] / "README.md").write_text("not data")
    (out["folder"] / ".hidden.jsonl").write_text("garbage")
    return out


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    return _write_all_formats(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize(
    "kind", ["jsonl", "json", "txt", "parquet", "arrow", "save_to_disk", "dataset_dict", "folder"]
)
def test_load_texts_every_format(formats, kind):
    assert documents.load_texts(str(formats[kind])) == DOCS


def test_load_texts_relative_to_base_dir_and_max_chars(formats):
    assert documents.load_texts("d.jsonl", base_dir=formats["jsonl"].parent) == DOCS
    # stops once the documents read hold max_chars characters
    assert documents.load_texts(str(formats["jsonl"]), max_chars=len(DOCS[0]) + 1) == DOCS[:2]


def test_folder_read_file_by_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
    (tmp_path / "b.jsonl").write_text('{"text": broken\n')
    # enough text in the first file: the broken second one is never opened
    assert documents.load_texts(str(tmp_path), max_chars=10) == DOCS[:1]
    with pytest.raises(CommuteError) as err:
        documents.load_texts(str(tmp_path))
    assert "b.jsonl" in _msg(err) and "a.jsonl" not in _msg(err)


def test_txt_paragraphs_and_blank_documents(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one line\nsame doc\n\n\n  \n\nsecond doc\n\n", encoding="utf-8")
    assert documents.load_texts(str(f)) == ["one line\nsame doc", "second doc"]
    g = tmp_path / "n.jsonl"
    g.write_text('{"text": "a"}\n{"text": ""}\n{"text": null}\n{"text": "b"}\n')
    assert documents.load_texts(str(g)) == ["a", "b"]


def _msg(err: pytest.ExceptionInfo) -> str:
    line = err.value.one_line()
    assert "\n" not in line
    return line


def test_load_texts_errors(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CommuteError) as err:
        documents.load_texts(str(latin))
    assert "not UTF-8" in _msg(err) and "latin.txt" in _msg(err)

    latin_json = tmp_path / "latin.jsonl"
    latin_json.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(CommuteError, match="not UTF-8"):
        documents.load_texts(str(latin_json))

    no_text = tmp_path / "body.jsonl"
    no_text.write_text('{"body": "hello"}\n')
    with pytest.raises(CommuteError) as err:
        documents.load_texts(str(no_text))
    assert "'text'" in _msg(err) and "body" in _msg(err)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"\n')
    with pytest.raises(CommuteError) as err:
        documents.load_texts(str(bad))
    assert "invalid JSON" in _msg(err) and "bad.jsonl" in _msg(err)

    number = tmp_path / "number.jsonl"
    number.write_text('{"text": 5}\n')
    with pytest.raises(CommuteError, match="not a string"):
        documents.load_texts(str(number))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CommuteError, match="empty"):
        documents.load_texts(str(empty))

    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    with pytest.raises(CommuteError, match="no text"):
        documents.load_texts(str(blank))

    for name in ("d.docx", "d.parquet.gz", "d.json.zip"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 not a supported data file")
        with pytest.raises(CommuteError, match="unsupported"):
            documents.load_texts(str(tmp_path / name))

    with pytest.raises(CommuteError, match="does not exist"):
        documents.load_texts(str(tmp_path / "missing.jsonl"))

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"text": "a"}\n')
    (mixed / "b.txt").write_text("b\n")
    with pytest.raises(CommuteError, match="mixes"):
        documents.load_texts(str(mixed))

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "notes.md").write_text("x")
    with pytest.raises(CommuteError, match="no data files"):
        documents.load_texts(str(nothing))


def test_hub_sources_fail_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder named like the sources
    for source, domain, shown in [
        ("c4", "en", "allenai/c4 (en)"),
        ("mc4", "ru", "allenai/c4 (ru)"),
        ("someone/corpus", "x", "someone/corpus"),
        ("someone/corpus:sub", "x", "someone/corpus (sub)"),
    ]:
        start = time.monotonic()
        with pytest.raises(CommuteError) as err:
            documents.load_texts(source, domain=domain)
        assert time.monotonic() - start < 3.0
        line = _msg(err)
        assert "can't reach" in line and "hub" in line and shown in line and "local" in line
    with pytest.raises(CommuteError, match="language"):
        documents.load_texts("mc4")
    # a local path wins over an alias
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "x.txt").write_text("local c4\n")
    assert documents.load_texts("c4", domain="en") == ["local c4"]


# --------------------------------------------------------------------------------- blocks


def test_pack_blocks_count_and_content(tokenizer):
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in DOCS:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    seq_len = 7
    blocks = sampling.pack_blocks(DOCS, tokenizer, seq_len)
    assert blocks.dtype == torch.long and blocks.shape == (len(ids) // seq_len, seq_len)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]
    assert int((blocks == eos).sum()) == sum(1 for i in ids[: blocks.numel()] if i == eos) >= 1
    # a document's tokens decode back to it
    first = ids.index(eos)
    assert tokenizer.decode(ids[:first]) == DOCS[0]


def test_pack_blocks_without_eos_and_too_short(tokenizer):
    from transformers import PreTrainedTokenizerFast

    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    assert no_eos.eos_token_id is None
    plain = [i for d in DOCS for i in no_eos(d, add_special_tokens=False)["input_ids"]]
    blocks = sampling.pack_blocks(DOCS, no_eos, 5)
    assert blocks.flatten().tolist() == plain[: blocks.numel()]

    with pytest.raises(CommuteError) as err:
        sampling.pack_blocks(["hi"], tokenizer, 64)
    assert "tokens" in _msg(err) and "seq_len=64" in _msg(err)


def test_sample_blocks_deterministic_without_replacement():
    blocks = torch.arange(100 * 4).view(100, 4)
    a = sampling.sample_blocks(blocks, 30, seed=7)
    b = sampling.sample_blocks(blocks, 30, seed=7)
    c = sampling.sample_blocks(blocks, 30, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = (a[:, 0] // 4).tolist()
    assert len(set(rows)) == 30 and torch.equal(a, blocks[rows])
    assert torch.equal(sampling.sample_blocks(blocks, 100, 0).sort(dim=0).values, blocks)
    with pytest.raises(CommuteError, match="only 100 blocks"):
        sampling.sample_blocks(blocks, 101, 0)


def test_split_parts_disjoint():
    sample = torch.arange(50 * 3).view(50, 3)
    parts = sampling.split_parts(sample, 4, 3)
    assert len(parts) == 4 and all(len(b) == 3 for b in parts)
    rows = [int(r) for b in parts for p in b for r in p[:, 0] // 3]
    assert all(p.shape == (4, 3) for b in parts for p in b)  # 50 // 12 = 4 rows per part
    assert len(rows) == len(set(rows)) == 48
    with pytest.raises(CommuteError, match="cannot fill"):
        sampling.split_parts(sample[:11], 4, 3)


# --------------------------------------------------------------------------------- cache


def test_cached_blocks_round_trip_and_invalidation(tmp_path, tokenizer):
    from safetensors.torch import save_file

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    cache = tmp_path / "cache"
    first = sampling.cached_blocks(str(src), tokenizer, 8, cache)
    assert torch.equal(first, sampling.pack_blocks(DOCS, tokenizer, 8))
    entries = list(cache.glob("blocks-*.safetensors"))
    assert len(entries) == 1 and not list(cache.glob(".*"))

    # a hit reads the entry: replace it by a sentinel and see the sentinel come back
    sentinel = torch.full((2, 8), 3, dtype=torch.long)
    save_file({"blocks": sentinel}, entries[0])
    assert torch.equal(sampling.cached_blocks(str(src), tokenizer, 8, cache), sentinel)

    # same size, same second, other content: a new entry with the new data
    swapped = [DOCS[1], DOCS[0], *DOCS[2:]]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in swapped))
    changed = sampling.cached_blocks(str(src), tokenizer, 8, cache)
    assert torch.equal(changed, sampling.pack_blocks(swapped, tokenizer, 8))
    assert len(list(cache.glob("blocks-*.safetensors"))) == 2

    # another seq_len is another entry; a damaged entry is recomputed
    assert sampling.cached_blocks(str(src), tokenizer, 4, cache).shape[1] == 4
    for entry in cache.glob("blocks-*.safetensors"):
        entry.write_bytes(b"damaged")
    assert torch.equal(sampling.cached_blocks(str(src), tokenizer, 8, cache), changed)
