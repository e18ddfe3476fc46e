"""`commute analyze` on data as it is published, through the real CLI on a tiny real training run:
a C4-style ``.json.gz`` shard gives the same numbers as its ``.jsonl``; a code domain whose text is in
``content`` is refused with its columns listed, and analysed with ``--text-field``; run.json says where
each sample came from."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from cli_runner import cli
from tiny_run import make_run

FAST = ["--samples", "24", "--blocks", "4", "--quiet", "--weights", "en=0.7", "xx=0.3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _analyze(run_dir: Path, out: Path, capsys, *args) -> tuple[int, str]:
    code, _, err = cli(["analyze", run_dir, *args, "--out", out, *FAST], capsys)
    return code, err


def test_json_gz_shards_give_the_numbers_of_the_jsonl(run_dir, tmp_path, capsys):
    en, xx = run_dir / "data" / "en.jsonl", run_dir / "data" / "xx.jsonl"
    c4 = tmp_path / "c4" / "en"
    c4.mkdir(parents=True)
    with gzip.open(c4 / "c4-train.00000-of-01024.json.gz", "wt", encoding="utf-8") as fh:
        for i, row in enumerate(_rows(en)):  # the published fields: text, timestamp, url
            fh.write(json.dumps({"text": row["text"], "timestamp": "2019-04-25", "url": f"u{i}"}) + "\n")
    # the same xx documents as a folder of gzipped shards of C4's multilingual naming
    mc4 = tmp_path / "c4" / "multilingual"
    mc4.mkdir()
    with gzip.open(mc4 / "c4-xx.tfrecord-00000-of-01024.json.gz", "wt", encoding="utf-8") as fh:
        fh.write(xx.read_text(encoding="utf-8"))
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    code, err = _analyze(run_dir, plain, capsys, "--domains", f"en={en}", f"xx={xx}")
    assert code == 0, err
    code, err = _analyze(run_dir, packed, capsys, "--domains", f"en={c4}", f"xx={mc4}")
    assert code == 0, err
    for name in ("results.csv", "losses.csv"):
        # the same numbers; only run_id differs (the run's identity includes the source paths)
        a, b = (pd.read_csv(d / name).drop(columns="run_id", errors="ignore") for d in (plain, packed))
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    run_a = json.loads((plain / "run.json").read_text())
    run_b = json.loads((packed / "run.json").read_text())
    assert run_a["sample_digest"] == run_b["sample_digest"]
    assert run_a["data_sha256"] == run_b["data_sha256"]
    shards = run_b["data"]["en"]["shards"]
    assert [s["name"] for s in shards] == ["c4-train.00000-of-01024.json.gz"]
    assert 0 < shards[0]["rows_read"] < len(_rows(en))  # only the documents the sample needs
    assert run_b["data"]["xx"]["shards"][0]["name"] == "c4-xx.tfrecord-00000-of-01024.json.gz"


def test_code_domain_in_content_column(run_dir, tmp_path, capsys):
    xx = run_dir / "data" / "xx.jsonl"
    code_file = tmp_path / "stack.jsonl"
    with code_file.open("w", encoding="utf-8") as fh:
        for row in _rows(xx):
            fh.write(json.dumps({"hexsha": "0" * 40, "lang": "Python", "content": row["text"]}) + "\n")
    en = run_dir / "data" / "en.jsonl"
    code, err = _analyze(run_dir, tmp_path / "o", capsys, "--domains", f"en={en}", f"xx={code_file}")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "hexsha, lang, content" in err and "--text-field xx=content" in err
    named = tmp_path / "named"
    code, err = _analyze(
        run_dir, named, capsys, "--domains", f"en={en}", f"xx={code_file}", "--text-field", "xx=content"
    )
    assert code == 0, err
    reference = tmp_path / "reference"
    code, err = _analyze(run_dir, reference, capsys, "--domains", f"en={en}", f"xx={xx}")
    assert code == 0, err
    a, b = (pd.read_csv(d / "results.csv").drop(columns="run_id") for d in (named, reference))
    pd.testing.assert_frame_equal(a, b)
    run = json.loads((named / "run.json").read_text())
    assert run["options"]["text_fields"] == ["xx=content"]
    assert run["data"]["xx"]["text_column"] == "content" and run["data"]["en"]["text_column"] == "text"
    code, err = _analyze(run_dir, tmp_path / "o2", capsys, "--text-field", "zz=content")
    assert code == 2 and "zz" in err and len(err.strip().splitlines()) == 1, err


def test_help_names_the_formats_and_the_text_field(capsys):
    code, out, _ = cli(["analyze", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0
    for word in (".zst", ".gz", ".parquet", "--text-field", "code=content"):
        assert word in text, word
