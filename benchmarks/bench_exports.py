"""How big and how slow ``recommend --export`` gets on long runs: the per-step CSV against the others.

Writes a late-phase schedule of a run of T steps (K = 4 domains, batches of 1024 rows, three pieces) in
every export format for T = 10k, 100k and 1M steps; prints each file's size and its write time as a ratio
to writing ``schedule.json`` in the same run (the cores are shared with other jobs: ratios, not seconds,
are what carries over). Also checks each run's rows per domain (the conservation the tests pin).

    python benchmarks/bench_exports.py        # about 10-20 s; writes benchmarks/results/bench_exports.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from commute_cli.core.phases import window_rows
from commute_cli.core.schedule import Schedule
from commute_cli.core.stages import schedule_stages, stage_totals
from commute_cli.io import exports
from commute_cli.io.schedules import save_schedule

from benchenv import environment

BATCH = 1024
OUT = Path(__file__).resolve().parent / "results" / "bench_exports.json"


def schedule_for(last: int) -> Schedule:
    w0 = {"en": 512 / BATCH, "code": 256 / BATCH, "de": 128 / BATCH, "ru": 128 / BATCH}
    w1 = {"en": 544 / BATCH, "code": 272 / BATCH, "de": 136 / BATCH, "ru": 72 / BATCH}
    w2 = {"en": 424 / BATCH, "code": 212 / BATCH, "de": 106 / BATCH, "ru": 282 / BATCH}
    return Schedule.from_entries([(0, w0), (last // 2, w1), (last * 9 // 10, w2)])


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for last in (10_000, 100_000, 1_000_000):
            sched = schedule_for(last)
            stages = schedule_stages(sched, last, BATCH)
            assert stage_totals(stages) == window_rows(sched, 0, last, BATCH)
            base = best_of(lambda s=sched: save_schedule(s, folder / "schedule.json"))
            for name, file in exports.FILES.items():
                t = best_of(
                    lambda n=name, s=sched, t=last: exports.write_exports(
                        s, [n], folder, last=t, batch_size=BATCH, seq_len=2048, seed=0
                    ),
                    repeats=1 if name == "csv-steps" and last >= 1_000_000 else 3,
                )
                size = (folder / file).stat().st_size
                rows.append(
                    {
                        "steps": last,
                        "format": name,
                        "bytes": size,
                        "seconds": t,
                        "ratio_to_schedule_json": t / base,
                    }
                )
                print(f"T={last:>9,} {name:<14} {size / 1e6:9.3f} MB  {t / base:9.1f}x schedule.json's time")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"env": environment(1), "batch_size": BATCH, "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
