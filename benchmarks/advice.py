"""Does following ``commute recommend`` pay off? Realised gains at equal data per domain, over fresh seeds.

For one run (a folder with checkpoints and its ``commute.json``), as a user would:

1. ``commute analyze RUN`` (skipped when ``--analysis`` already holds it);
2. ``commute recommend --target T`` for every target (the real console script: its screen and confirmation
   on the run's own seeds are the tool's cost, reported as a fraction of the run's training);
3. follow each proposal on *fresh* stream seeds (not those recommend chose on, so the winner's curse does not
   inflate the result): continue the start checkpoint with the proposed schedule to the run's last step, and
   with the schedule that was run on the same seed (``commands.continuations``: the machinery of
   ``commute train --init``), and the same for the practitioner's heuristics of the same family
   ("low-resource late", "high-resource late");
4. report, per target: the realised paired change of every final loss (mean +- SE over the fresh seeds), the
   best heuristic's, the change recommend measured while choosing, and the bracket's prediction, with the
   ratios realised/measured and realised/predicted.

Results as JSON with the environment; a Pareto figure (final L_i against L_j of every schedule followed).

    .venv/bin/python benchmarks/advice.py --run sample_checkpoints \
        --out benchmarks/results/advice_shipped.json

Cost on the shipped run (2-core CPU, --jobs 2): about an hour.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchenv import environment


def paired(arm: dict[int, float], base: dict[int, float]) -> dict[str, float]:
    """Mean and SE of the paired differences (``phase_advice.paired_gain``, what recommend quotes)."""
    from commute_cli.commands.phase_advice import paired_gain

    g = paired_gain(arm, base, 0.95)
    assert g is not None, "no common seed"
    return {"mean": g.mean, "se": g.se, "n": g.n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("sample_checkpoints"))
    ap.add_argument(
        "--analysis", type=Path, default=None, help="analyze output (default: OUT's folder/analysis)"
    )
    ap.add_argument("--targets", nargs="+", default=["mix", "ru", "en"])
    ap.add_argument("--follow-seeds", nargs="+", type=int, default=[101, 102, 103])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--recommend-args", default="", help="extra arguments for commute recommend")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/advice_shipped.json"))
    args = ap.parse_args()
    commute = str(Path(sys.executable).parent / "commute")
    work = args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    analysis = args.analysis or work / "analysis"
    began = time.monotonic()
    if not (analysis / "results.csv").is_file():
        subprocess.run([commute, "analyze", str(args.run), "--out", str(analysis), "-q"], check=True)
    analysis_seconds = json.loads((analysis / "run.json").read_text())["elapsed_seconds"]

    from commute_cli.commands import continuations
    from commute_cli.commands.stats import quiet_libraries
    from commute_cli.core.schedule import Schedule

    quiet_libraries()
    report: dict = {"run": str(args.run), "targets": {}, "follow_seeds": args.follow_seeds}
    followed: dict[str, dict] = {}  # label -> {"schedule", "start", "losses": {seed: {...}}}
    for target in args.targets:
        out = work / f"recommend_{target}"
        cmd = [
            commute,
            "recommend",
            "--target",
            target,
            "--from",
            str(analysis),
            "--out",
            str(out),
            "-q",
            "--jobs",
            str(args.jobs),
            *args.recommend_args.split(),
        ]
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rec = json.loads((out / "recommend.json").read_text())
        rec["wall_seconds"] = time.monotonic() - t0
        report["targets"][target] = {"recommend": rec, "command": " ".join(cmd[1:])}
        start = rec["start"]
        for c in rec["candidates"]:
            if c["label"] == (rec["chosen"] or {}).get("label") or c["heuristic"]:
                followed.setdefault(c["label"], {"start": start, "records": None, "candidate": c})
    # the schedules themselves: from the recommend outputs
    for target in args.targets:
        rec = report["targets"][target]["recommend"]
        for c in rec["candidates"]:
            if c["label"] in followed and followed[c["label"]]["records"] is None:
                followed[c["label"]]["records"] = schedule_records(rec, c)
    first = next(iter(report["targets"].values()))["recommend"]
    original = Schedule.from_records(first["original_schedule"])
    starts = {v["start"] for v in followed.values()} or {first["start"]}
    measured: dict[str, dict[int, dict[str, float]]] = {}
    cache = analysis / "cache"
    for start_step in sorted(starts):
        scratch = start_step == 0  # a retrain: the earliest checkpoint gives the run's model config
        steps = {int(p.name.rsplit("-", 1)[1]): p for p in args.run.glob("*-*") if p.name[-1].isdigit()}
        ckpt = steps[min(s for s in steps if s > 0)] if scratch else steps[start_step]
        start = continuations.load_start(
            ckpt, first["last_step"], lambda m: print(m, file=sys.stderr), scratch=scratch
        )
        arms = {"the run's schedule": original}
        arms.update(
            {
                lab: Schedule.from_records(v["records"])
                for lab, v in followed.items()
                if v["start"] == start_step
            }
        )
        jobs = [(sched, seed) for sched in arms.values() for seed in args.follow_seeds]
        t0 = time.monotonic()
        done = continuations.run_many(start, jobs, workers=args.jobs, cache=cache)
        report.setdefault("follow_seconds", 0.0)
        report["follow_seconds"] += time.monotonic() - t0
        for (label, _sched), chunk in zip(
            arms.items(),
            [done[i : i + len(args.follow_seeds)] for i in range(0, len(done), len(args.follow_seeds))],
            strict=True,
        ):
            measured[label] = dict(zip(args.follow_seeds, chunk, strict=True))
    mixw = first["mix_weights"]

    def loss(v: dict[str, float], t: str) -> float:
        return sum(mixw[n] * v[n] for n in mixw) if t == "mix" else v[t]

    base = measured["the run's schedule"]
    domains = list(original.domains)
    all_targets = [*domains, "mix"]
    report["followed"] = {}
    for label, per_seed in measured.items():
        report["followed"][label] = {
            "losses": {str(s): v for s, v in per_seed.items()},
            "realised": {
                t: paired(
                    {s: loss(v, t) for s, v in per_seed.items()}, {s: loss(v, t) for s, v in base.items()}
                )
                for t in all_targets
            },
            "heuristic": followed.get(label, {}).get("candidate", {}).get("heuristic"),
        }
    lines = []
    for target in args.targets:
        rec = report["targets"][target]["recommend"]
        chosen = (rec["chosen"] or {}).get("label")
        heur = {lab: v for lab, v in report["followed"].items() if v["heuristic"]}
        best_h = min(heur.items(), key=lambda kv: kv[1]["realised"][target]["mean"]) if heur else None
        row = {"target": target, "chosen": chosen, "summary": rec["summary"]}
        if chosen:
            r = report["followed"][chosen]["realised"][target]
            cand = next(c for c in rec["candidates"] if c["label"] == chosen)
            sel = cand["measured"].get(target, {})
            pred = cand["predicted"].get(target, {}).get("change")
            row.update(
                realised=r,
                selection_measured=sel,
                predicted_bracket=pred,
                realised_over_selection=r["mean"] / sel["mean"] if sel.get("mean") else None,
                realised_over_predicted=r["mean"] / pred if pred else None,
            )
        if best_h:
            row.update(best_heuristic=best_h[0], best_heuristic_realised=best_h[1]["realised"][target])
        row["cost_fraction_of_run"] = rec["cost"]["fraction_of_run"]
        row["analysis_seconds"] = analysis_seconds
        report["targets"][target]["result"] = row
        fmt = lambda g: f"{g['mean'] * 1e3:+.1f} ± {g['se'] * 1e3:.1f}"  # noqa: E731
        lines.append(
            f"{target:>4}: recommend {chosen or 'nothing'}"
            + (f" realised {fmt(row['realised'])} mnat" if chosen else "")
            + (f" | best heuristic {best_h[0]} {fmt(best_h[1]['realised'][target])} mnat" if best_h else "")
            + (
                f" | realised/selection {row['realised_over_selection']:.2f}"
                if chosen and row.get("realised_over_selection")
                else ""
            )
            + (
                f" | realised/bracket {row['realised_over_predicted']:.3g}"
                if chosen and row.get("realised_over_predicted")
                else ""
            )
            + f" | verification {row['cost_fraction_of_run']:.1f}x the run"
        )
    report["seconds"] = time.monotonic() - began
    report["environment"] = environment(threads=1, jobs=args.jobs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    pareto(report, domains, args.out.with_suffix(".png"))
    print("\n".join(lines))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({report['seconds'] / 60:.0f} min)")


def schedule_records(rec: dict, cand: dict) -> list[dict]:
    """The full schedule of a candidate: the run's entries before its start, then its phases."""
    before = [e for e in rec["original_schedule"] if e["step"] < cand["start"]]
    return [*before, *cand["early_weights"], {"step": cand["switch"], "weights": cand["late_weights"]}]


def pareto(report: dict, domains: list[str], file: Path) -> None:
    """Final L_i against L_j (mean over the fresh seeds) of every schedule followed, as in the paper's
    Figures 3-4; the run's schedule at the origin of the deltas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = domains[0], domains[1]
    fig, ax = plt.subplots(figsize=(6, 5))
    for label, v in report["followed"].items():
        r = v["realised"]
        x, y = r[a]["mean"] * 1e3, r[b]["mean"] * 1e3
        ax.errorbar(x, y, xerr=r[a]["se"] * 1e3, yerr=r[b]["se"] * 1e3, fmt="o", capsize=3)
        tag = label + (f" ({v['heuristic']})" if v["heuristic"] else "")
        ax.annotate(tag, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"ΔL_{a} (mnat, vs the run's schedule)")
    ax.set_ylabel(f"ΔL_{b} (mnat)")
    ax.set_title("final losses of the schedules followed (mean ± SE, fresh seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=120)


if __name__ == "__main__":
    main()
