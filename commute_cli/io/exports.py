"""A schedule written in the forms other trainers read (``commute recommend --export FORMAT``).

Every format is built from the stages of ``core.stages.schedule_stages`` (steps ``[start, end)`` with
whole rows of each domain per batch of ``B``), so each keeps the rows per domain of the schedule exactly:

- ``csv-steps`` (``schedule_steps.csv``): one line per optimizer step, ``step,<domain weights>`` with the
  weights ``rows / B``. Per step, not per range (the range form is ``schedule.csv``): a callback looks its
  step up by line; 1M steps of 4 domains are 37 MB, written in about 3 s (``benchmarks/bench_exports.py``).
  It is also a schedule file commute reads.
- ``hf-interleave`` (``schedule_hf_interleave.json``): per phase the domains drawn from (those with rows),
  ``probabilities`` in that order, the exact ``rows`` of each and where each domain's rows start
  (``offsets``, so no row is read twice). ``datasets.interleave_datasets`` on
  ``ds.select(range(offset, offset + rows))`` per domain with ``stopping_strategy=
  "all_exhausted_without_replacement"`` draws every selected row exactly once: the totals are exact, the
  order inside a phase is ``datasets``' seeded draw (the mix drifts near a phase's end, where a domain runs
  out first). A domain with no rows is left out of the phase: ``interleave_datasets`` never ends on an
  empty dataset with that strategy.
- ``megatron`` (``schedule_megatron.txt``): per phase one line ``--data-path w1 {en} w2 {ru}
  --global-batch-size B --train-iters END`` with the weights as rows per batch (Megatron normalises them,
  and its blend of whole batches then reads exactly ``rows x steps`` samples of each domain; the test runs
  Megatron-core's own ``get_blend_from_list`` and blending indices). ``{en}`` stands for the domain's
  indexed dataset prefix. Phases after the first resume from the checkpoint saved at their first step.
- ``nanotron`` (``schedule_nanotron.yaml``): ``data_stages`` as nanotron's ``DatasetStageArgs`` documents
  them: ``name``, ``start_training_step`` (nanotron counts steps from 1: commute's step ``s`` is its
  ``s + 1``) and ``data.dataset`` with ``dataset_folder`` / ``dataset_weights`` (a Nanoset per domain,
  ``{en}`` standing for its folder). The weights are exact (``rows / B``), but a Nanoset shuffles its
  blended index with ``data.seed``: within a stage the rows per domain match them in expectation, not
  row for row (exactly only over a whole epoch of the blend). nanotron on PyPI (0.4) predates data stages
  and Nanosets: the test checks the structure that nanotron's ``Config`` checks, read back with PyYAML.
- ``torchtitan`` is refused: its dataloader reads one dataset and has no data stages.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commute_cli.core.schedule import Schedule
from commute_cli.core.stages import Stage, schedule_stages, stage_offsets, stage_totals
from commute_cli.errors import CommuteError
from commute_cli.io import atomic

FILES = {
    "csv-steps": "schedule_steps.csv",
    "hf-interleave": "schedule_hf_interleave.json",
    "megatron": "schedule_megatron.txt",
    "nanotron": "schedule_nanotron.yaml",
}
"""Each export format and the file it is written to (beside schedule.json)."""

REFUSED = {
    "torchtitan": "torchtitan has no data stages (its dataloader reads one dataset)",
}
HF_STRATEGY = "all_exhausted_without_replacement"


def check_formats(names: Sequence[str]) -> list[str]:
    """The export formats asked for, once each, in order; ``CommuteError`` for one that does not exist."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name in REFUSED:
            raise CommuteError(
                f"cannot export {name}: {REFUSED[name]}",
                hint="export hf-interleave (a dataset per phase to register with it) or csv-steps; "
                f"the formats are {', '.join(FILES)}",
            )
        if name not in FILES:
            raise CommuteError(f"unknown export format {raw!r}", hint=f"the formats are {', '.join(FILES)}")
        if name not in out:
            out.append(name)
    return out


def placeholder(domain: str) -> str:
    """What stands for a domain's data path in the megatron and nanotron exports: ``{en}``."""
    return "{" + domain + "}"


# ------------------------------------------------------------------------------------------------ formats


def csv_steps_text(stages: Sequence[Stage]) -> str:
    """``step,<domain1>,...``: one line per optimizer step ``0 .. T-1`` with that step's ``rows / B``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", *stages[0].domains])
    for st in stages:
        cells = [repr(w) for w in st.weights]
        for step in range(st.start, st.end):
            writer.writerow([step, *cells])
    return buf.getvalue()


def hf_interleave_record(
    stages: Sequence[Stage], seq_len: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """The ``hf-interleave`` JSON: one entry per phase (module docstring)."""
    phases = []
    for st, before in zip(stages, stage_offsets(stages), strict=True):
        used = [k for k, r in enumerate(st.rows) if r > 0]
        phases.append(
            {
                "start_step": st.start,
                "end_step": st.end,
                "max_steps": st.steps,
                "examples": st.steps * st.batch_size,
                "domains": [st.domains[k] for k in used],
                "probabilities": [st.weights[k] for k in used],
                "rows": {st.domains[k]: st.total_rows[k] for k in used},
                "offsets": {st.domains[k]: before[st.domains[k]] for k in used},
            }
        )
    return {
        "format": "commute-hf-interleave/1",
        "domains": list(stages[0].domains),
        "batch_size": stages[0].batch_size,
        "seq_len": seq_len,
        "seed": seed,
        "stopping_strategy": HF_STRATEGY,
        "totals": stage_totals(stages),
        "usage": "per phase: parts = [ds[d].select(range(offsets[d], offsets[d] + rows[d])) for d in "
        "domains]; interleave_datasets(parts, probabilities=probabilities, seed=seed, "
        "stopping_strategy=stopping_strategy); train max_steps steps of batch_size rows on it",
        "phases": phases,
    }


def megatron_text(stages: Sequence[Stage]) -> str:
    """One Megatron-LM argument line per phase, with comments (module docstring)."""
    names = ", ".join(placeholder(d) for d in stages[0].domains)
    lines = [
        "# Megatron-LM data blend per phase (commute recommend --export megatron): one run per line.",
        f"# Replace {names} by the path prefix of each domain's indexed dataset (its .bin/.idx pair).",
        "# Weights are rows per batch; phases after the first resume (--load) from the checkpoint saved at",
        "# their first step. Megatron re-indexes a domain when its blend changes: the rows per domain are",
        "# exact, which rows it reads is Megatron's.",
    ]
    for i, st in enumerate(stages, start=1):
        pairs = [(str(r), placeholder(d)) for d, r in zip(st.domains, st.rows, strict=True) if r > 0]
        blend = [x for pair in pairs for x in pair]
        resume = f", resume at iteration {st.start}" if st.start > 0 else ""
        rows = " ".join(f"{d}={n}" for d, n in st.rows_by_domain().items())
        lines.append(f"# phase {i}/{len(stages)}: steps {st.start}-{st.end}{resume}; rows {rows}")
        args = ["--data-path", *blend, "--global-batch-size", str(st.batch_size)]
        lines.append(shlex.join([*args, "--train-iters", str(st.end)]))
    return "\n".join(lines) + "\n"


def nanotron_record(stages: Sequence[Stage], seed: int | None = None) -> dict[str, Any]:
    """nanotron's ``data_stages`` (a list of ``DatasetStageArgs``) for the stages."""
    out = []
    for i, st in enumerate(stages, start=1):
        used = [k for k, r in enumerate(st.rows) if r > 0]
        data: dict[str, Any] = {
            "dataset": {
                "dataset_folder": [placeholder(st.domains[k]) for k in used],
                "dataset_weights": [st.weights[k] for k in used],
            },
            "num_loading_workers": 1,
        }
        if seed is not None:
            data["seed"] = seed
        name = f"phase {i} (steps {st.start}-{st.end})"
        out.append({"name": name, "start_training_step": st.start + 1, "data": data})
    return {"data_stages": out}


def nanotron_text(stages: Sequence[Stage], seed: int | None = None) -> str:
    import yaml

    last, batch = stages[-1].end, stages[0].batch_size
    names = ", ".join(placeholder(d) for d in stages[0].domains)
    head = [
        "# nanotron data_stages (commute recommend --export nanotron): merge into your config.",
        f"# Replace {names} by each domain's Nanoset folder; with tokens.train_steps: {last} and a global",
        f"# batch of {batch} sequences (micro_batch_size x batch_accumulation_per_replica x dp). A Nanoset",
        "# shuffles its blend with data.seed: a stage's rows per domain match the weights in expectation.",
    ]
    body = yaml.safe_dump(nanotron_record(stages, seed), sort_keys=False, default_flow_style=False)
    return "\n".join(head) + "\n" + body


# ------------------------------------------------------------------------------------------------ files


def write_exports(
    schedule: Schedule,
    formats: Sequence[str],
    folder: str | os.PathLike[str],
    *,
    last: int,
    batch_size: int,
    seq_len: int | None = None,
    seed: int | None = None,
) -> list[Path]:
    """Write each of ``formats`` (names of :data:`FILES`) for ``schedule`` over steps ``[0, last)`` with
    batches of ``batch_size`` rows into ``folder``, each atomically; returns the files written.

    Raises ``CommuteError`` for an unknown format, ``last < 1`` or ``batch_size < 1``.
    """
    names = check_formats(formats)
    stages = schedule_stages(schedule, last, batch_size)
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommuteError(f"cannot create {out}: {err.strerror}", hint="pass --out DIR") from err
    files = []
    for name in names:
        if name == "csv-steps":
            text = csv_steps_text(stages)
        elif name == "hf-interleave":
            text = json.dumps(hf_interleave_record(stages, seq_len, seed or 0), indent=2) + "\n"
        elif name == "megatron":
            text = megatron_text(stages)
        else:
            text = nanotron_text(stages, seed)
        files.append(atomic.write_text(out / FILES[name], text))
    return files


@dataclass(frozen=True)
class ExportPlan:
    """``recommend --export``: the formats asked for and what they need, checked before any long work."""

    formats: list[str]
    folder: Path
    batch_size: int | None
    seq_len: int | None = None
    seed: int | None = None

    @classmethod
    def check(
        cls,
        names: Sequence[str],
        folder: str | os.PathLike[str],
        batch_size: int | None,
        manifest: Mapping[str, Any],
    ) -> ExportPlan:
        """The plan for ``names`` (``--export``); the batch size is ``batch_size`` (``--batch-size``), else
        the run manifest's. Raises ``CommuteError`` for an unknown format, or formats without a batch size
        (rows per step is what every format is written in)."""
        formats = check_formats(names)

        def whole(key: str) -> int | None:
            value = manifest.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        batch = batch_size if batch_size is not None else whole("batch_size")
        if formats and batch is None:
            raise CommuteError(
                "--export needs the run's batch size (rows per step): the run has no commute.json with one",
                hint="pass --batch-size B (the trainer's global batch size, in sequences)",
            )
        seed = manifest.get("seed")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else None
        return cls(formats, Path(folder), batch, whole("seq_len"), seed)

    def write(self, schedule: Schedule, last: int) -> list[Path]:
        """Every format of the plan for ``schedule`` over steps ``[0, last)`` (:func:`write_exports`)."""
        assert self.batch_size is not None  # check() refuses formats without one
        return write_exports(
            schedule, self.formats, self.folder, last=last, batch_size=self.batch_size,
            seq_len=self.seq_len, seed=self.seed,
        )  # fmt: skip
