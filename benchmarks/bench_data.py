"""Cost of preparing one domain's analysis sample: a 2 GB domain against a 10 MB one (issue 12).

``commute analyze`` draws each domain's sample with ``sampling.sample_domain`` (a bounded read: only the
documents the sample needs, spread over up to ``MAX_SHARDS`` shards). This script checks that its cost does
not grow with the corpus. Everything is measured in ONE run of this script:

- data is generated in a temporary folder, stream-written (never held in memory) from the English
  documents of ``sample_checkpoints/data/en`` with a distinct ``[i]`` prefix per document, and deleted
  after its measurements, one layout at a time:
  ``single``: one ``.jsonl`` file of 10 MB, and one of 2 GB;
  ``shards``: C4-style gzipped shards ``c4-train.NNNNN-of-MMMMM.json.gz`` (fields text/timestamp/url),
  10 MB of JSON in 16 shards, and 2 GB of JSON in 256 shards;
- each measurement is a fresh process (``--child``), pinned to one thread, that imports everything, loads
  the sample tokenizer, resets its peak resident set (``/proc/self/clear_refs``), then prepares the domain
  exactly as ``analyze`` does (``sample_domain`` with ``--samples 96``, ``--seq-len 256``, the domain seed
  of ``--seed 0``) and reports the wall time of that call and the peak resident set (``VmHWM``), absolute
  and above the post-import baseline;
- the 10 MB and 2 GB runs of a layout are interleaved, ``--repeats`` times (median taken).

Printed and written to ``benchmarks/results/bench_data.json`` (with the environment): per layout, the
2 GB / 10 MB ratios of time and peak memory. Goal: within 1.2x in both.

Usage: ``python benchmarks/bench_data.py [--repeats 3] [--big-mb 2000] [--small-mb 10] [--dir DIR]``
(about 3 minutes on a 2-core CPU, most of it writing and gzipping the data).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import environment

ROOT = Path(__file__).resolve().parent.parent
SAMPLES, SEQ_LEN, SEED, DOMAIN = 96, 256, 0, "en"
THREAD_VARS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}


def proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(source: str) -> dict:
    """Prepare one domain the way ``analyze`` does; time and peak memory of that alone."""
    import torch

    torch.set_num_threads(1)
    from commute_cli.commands import analyze as analysis
    from commute_cli.io import checkpoints, sampling

    tokenizer = checkpoints.load_tokenizer(ROOT / "sample_checkpoints" / "tokenizer")
    analysis.quiet_libraries()
    base = proc_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    drawn = sampling.sample_domain(
        source, tokenizer, SEQ_LEN, SAMPLES, analysis.domain_seed(SEED, DOMAIN), domain=DOMAIN
    )
    wall = time.perf_counter() - t0
    prov = drawn.provenance
    return {
        "seconds": wall,
        "peak_mib": proc_kib("VmHWM") / 1024,
        "above_base_mib": (proc_kib("VmHWM") - base) / 1024,
        "shards_read": len(prov["shards"]),
        "shards_total": prov["shards_total"],
        "rows_read": sum(s["rows_read"] for s in prov["shards"]),
        "documents": prov["documents"],
        "characters": prov["characters"],
        "blocks": list(drawn.blocks.shape),
    }


def run_child(source: Path) -> dict:
    env = {
        **os.environ,
        **THREAD_VARS,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(source)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed on {source}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def source_lines() -> list[str]:
    texts = []
    for name in ("train.jsonl", "validation.jsonl"):
        with open(ROOT / "sample_checkpoints" / "data" / "en" / name, encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    return texts


def write_stream(fh, texts: list[str], n_bytes: int, start: int, c4: bool) -> int:
    """Write documents ``[start] text`` until ``n_bytes`` bytes of JSON lines; returns the next index."""
    written, i = 0, start
    while written < n_bytes:
        row = {"text": f"[{i}] {texts[i % len(texts)]}"}
        if c4:
            row.update({"timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"})
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        fh.write(line)
        written += len(line)
        i += 1
    return i


def make_single(path: Path, mb: float, texts: list[str]) -> Path:
    with path.open("wb", buffering=1 << 22) as fh:
        write_stream(fh, texts, int(mb * 1e6), 0, c4=False)
    return path


def make_shards(folder: Path, mb: float, n_shards: int, texts: list[str]) -> Path:
    folder.mkdir(parents=True)
    i = 0
    for s in range(n_shards):
        name = folder / f"c4-train.{s:05d}-of-{n_shards:05d}.json.gz"
        with gzip.open(name, "wb", compresslevel=1) as fh:
            i = write_stream(fh, texts, int(mb * 1e6 / n_shards), i, c4=True)
    return folder


def size_of(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def measure(small: Path, big: Path, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {"small": [], "big": []}
    for r in range(repeats):
        order = ("small", "big") if r % 2 == 0 else ("big", "small")
        for which in order:
            runs[which].append(run_child(small if which == "small" else big))
    med = {
        w: {k: statistics.median(x[k] for x in runs[w]) for k in ("seconds", "peak_mib", "above_base_mib")}
        for w in runs
    }
    return {
        "small": {"bytes_on_disk": size_of(small), "median": med["small"], "runs": runs["small"]},
        "big": {"bytes_on_disk": size_of(big), "median": med["big"], "runs": runs["big"]},
        "ratio_time": med["big"]["seconds"] / med["small"]["seconds"],
        "ratio_peak_rss": med["big"]["peak_mib"] / med["small"]["peak_mib"],
        "ratio_above_baseline": med["big"]["above_base_mib"] / max(med["small"]["above_base_mib"], 1e-9),
    }


def shards(side: dict) -> str:
    run = side["runs"][0]
    return f"{run['shards_read']}/{run['shards_total']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-mb", type=float, default=2000.0)
    ap.add_argument("--small-mb", type=float, default=10.0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    texts = source_lines()
    work = Path(tempfile.mkdtemp(prefix="bench_data-", dir=args.dir))
    results: dict[str, dict] = {}
    try:
        for layout in ("single", "shards"):
            t0 = time.perf_counter()
            if layout == "single":
                small = make_single(work / "small.jsonl", args.small_mb, texts)
                big = make_single(work / "big.jsonl", args.big_mb, texts)
            else:
                small = make_shards(work / "small_shards", args.small_mb, 16, texts)
                big = make_shards(work / "big_shards", args.big_mb, 256, texts)
            made = time.perf_counter() - t0
            res = measure(small, big, args.repeats)
            res["generate_seconds"] = made
            results[layout] = res
            s, b = res["small"], res["big"]
            print(
                f"{layout:7s} {s['bytes_on_disk'] / 1e6:.1f} MB vs {b['bytes_on_disk'] / 1e6:.1f} MB on disk "
                f"(JSON {args.small_mb:g} MB vs {args.big_mb:g} MB; generated in {made:.0f} s): "
                f"prepare {s['median']['seconds']:.2f} s vs {b['median']['seconds']:.2f} s "
                f"(x{res['ratio_time']:.2f}); peak RSS {s['median']['peak_mib']:.0f} vs "
                f"{b['median']['peak_mib']:.0f} MiB (x{res['ratio_peak_rss']:.2f}; above the post-import "
                f"baseline {s['median']['above_base_mib']:.1f} vs {b['median']['above_base_mib']:.1f} MiB, "
                f"x{res['ratio_above_baseline']:.2f}); shards read {shards(s)} vs {shards(b)}, "
                f"rows read {s['runs'][0]['rows_read']} vs {b['runs'][0]['rows_read']}",
                flush=True,
            )
            shutil.rmtree(work / "small_shards", ignore_errors=True)
            shutil.rmtree(work / "big_shards", ignore_errors=True)
            for f in (work / "small.jsonl", work / "big.jsonl"):
                f.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    goal = all(r["ratio_time"] <= 1.2 and r["ratio_peak_rss"] <= 1.2 for r in results.values())
    print(
        f"goal (2 GB within 1.2x of 10 MB in time and peak RSS, every layout): {'met' if goal else 'NOT met'}"
    )
    out = ROOT / "benchmarks" / "results" / "bench_data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "bench_data",
        "what": "time and peak RSS of preparing one analysis sample (sampling.sample_domain), 2 GB vs 10 MB",
        "settings": {
            "samples": SAMPLES,
            "seq_len": SEQ_LEN,
            "seed": SEED,
            "repeats": args.repeats,
            "small_mb": args.small_mb,
            "big_mb": args.big_mb,
        },
        "environment": environment(1),
        "results": results,
        "goal_met": goal,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
