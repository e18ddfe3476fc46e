"""The mixture trainer and the shipped sample checkpoints.

Real short training runs of a tiny GPT-2 (one layer, d=16, 32-token blocks) on the start of the shipped
en/ru shards with the shipped tokenizer: batch composition, exact resumption, the saved files, the CLI.
Then the shipped ``sample_checkpoints/`` themselves: size, loading, language of the shards, and a
validation loss that decreases along the trajectory.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from commute_cli.cli import main
from commute_cli.commands import train as tr
from commute_cli.commands import validate as V
from commute_cli.core.mixing import batch_counts
from commute_cli.core.schedule import Schedule
from commute_cli.engine import training as T
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints

from tiny_run import sample_shards

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_checkpoints"
TOKENIZER = SAMPLES / "tokenizer"
TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The first documents of the shipped shards (about 20k characters per domain), in a temporary folder."""
    root = sample_shards(tmp_path_factory.mktemp("data"), 20_000, 4_000, 3000)
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


def config(data: Path, out: Path, **kw) -> tr.TrainConfig:
    base = {
        "out_dir": out,
        "domains": {"en": str(data / "en/train.jsonl"), "ru": str(data / "ru/train.jsonl")},
        "eval_domains": {"en": str(data / "en/validation.jsonl"), "ru": str(data / "ru/validation.jsonl")},
        "tokenizer": str(TOKENIZER),
        "weights": {"en": 0.75, "ru": 0.25},
        "steps": 8,
        "save_every": 4,
        "batch_size": 8,
        "seq_len": 32,
        "lr": 3e-3,
        "init": str(data / "tiny.json"),
        "logging_steps": 2,
        "quiet": True,
    }
    base.update(kw)
    return tr.TrainConfig(**base)


def params(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize(
    ("weights", "batch", "counts"),
    [
        ((0.8, 0.2), 20, [16, 4]),
        ((0.8, 0.2), 16, [13, 3]),
        ((0.7, 0.3), 10, [7, 3]),
        ((1 / 3, 1 / 3, 1 / 3), 10, [4, 3, 3]),
        ((0.5, 0.5), 3, [2, 1]),
        ((1.0, 0.0), 7, [7, 0]),
        ((0.05, 0.95), 4, [0, 4]),
        ((0.29, 0.71), 100, [29, 71]),
    ],
)
def test_batch_counts_largest_remainder(weights, batch, counts):
    assert batch_counts(weights, batch) == counts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=6).filter(any), st.integers(1, 300))
def test_batch_counts_property(raw, batch):
    w = [x / sum(raw) for x in raw]
    counts = batch_counts(w, batch)
    assert sum(counts) == batch
    for c, wi in zip(counts, w, strict=True):
        assert abs(c - batch * wi) < 1 + 1e-9  # floor or ceil of B w
    assert batch_counts(w, batch) == counts  # deterministic


def test_stream_visits_every_block_once_per_epoch():
    blocks = torch.arange(10).view(10, 1)
    s = T.DomainStream("en", blocks, seed=3)
    first, second = s.take(10).view(-1), s.take(10).view(-1)
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)  # reshuffled each epoch
    a, b = T.DomainStream("en", blocks, seed=3, position=7), T.DomainStream("en", blocks, seed=3)
    b.take(7)
    assert torch.equal(a.take(9), b.take(9))  # the position is the whole state
    c = a.copy()
    assert torch.equal(a.take(5), c.take(5))
    ru, en = T.DomainStream("ru", blocks, 3), T.DomainStream("en", blocks, 3)
    assert not torch.equal(ru.take(10), en.take(10))  # each domain has its own stream


def test_batches_follow_a_piecewise_schedule_exactly():
    """Rows per domain at every step are the largest-remainder counts of the weights in force; each row
    comes from its own domain's stream, in that stream's order."""
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    blocks = {n: torch.randint(0, 64, (50, 8)) for n in ("en", "ru", "py")}
    sched = Schedule.from_entries(
        [
            (0, {"en": 0.8, "ru": 0.2, "py": 0.0}),
            (3, {"en": 0.5, "ru": 0.25, "py": 0.25}),
            (5, {"en": 0.1, "ru": 0.3, "py": 0.6}),
        ]
    )
    streams = [T.DomainStream(n, b, seed=1) for n, b in blocks.items()]
    opt = T.build_optimizer(model, "sgd", 0.1, decay=checkpoints.decay_parameter_names(model))
    results = T.train_branch(model, opt, streams, sched, 0, 7, batch_size=10, lr_fn=lambda s: 0.1)
    rows = [r.domain_rows for r in results]
    assert (
        rows
        == [{"en": 8, "ru": 2, "py": 0}] * 3
        + [{"en": 5, "ru": 3, "py": 2}] * 2
        + [{"en": 1, "ru": 3, "py": 6}] * 2
    )
    assert [r.step for r in results] == list(range(1, 8))
    for s in streams:
        assert s.position == sum(r[s.name] for r in rows)
    # the batch itself: rows of each domain, in domain order, drawn from that domain's stream
    fresh = [T.DomainStream(n, b, seed=1) for n, b in blocks.items()]
    ids, owner = T.compose_batch(fresh, [0.5, 0.25, 0.25], 10)
    assert owner.tolist() == [0] * 5 + [1] * 3 + [2] * 2
    again = [T.DomainStream(n, b, seed=1) for n, b in blocks.items()]
    assert torch.equal(ids, torch.cat([again[0].take(5), again[1].take(3), again[2].take(2)]))


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "mps"])
def test_resolve_device_accepts_every_valid_name(name):
    """The one resolve_device (analyze, validate, train and the preview use it): auto, cpu, cuda, cuda:N
    and mps; a device this machine lacks is a one-line error that says so."""
    available = {
        "auto": True,
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "cuda:0": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }[name]
    if available:
        device = T.resolve_device(name)
        assert device.type in ("cpu", "cuda", "mps") and (name == "auto" or device == torch.device(name))
    else:
        with pytest.raises(CommuteError, match=r"was asked for but no .* device is available"):
            T.resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "meta", "cuda:x", "cuda0", "CPU", ""])
def test_resolve_device_refuses_other_names(name):
    with pytest.raises(CommuteError, match="unknown device") as err:
        T.resolve_device(name)
    assert "auto, cpu, cuda" in (err.value.hint or "")


def test_lr_schedules():
    assert T.lr_at(0, 1e-3) == T.lr_at(999, 1e-3) == 1e-3
    assert T.lr_at(0, 1.0, "constant", 100, warmup=4) == 0.25
    assert T.lr_at(3, 1.0, "cosine", 100, warmup=4) == 1.0
    assert T.lr_at(4, 1.0, "cosine", 100, warmup=4) == 1.0
    assert T.lr_at(52, 1.0, "cosine", 100, warmup=4) == pytest.approx(0.5)
    assert T.lr_at(100, 1.0, "cosine", 100, warmup=4) == pytest.approx(0.0)
    with pytest.raises(CommuteError):
        T.lr_at(10, 1.0, "linear", 100)


def test_optimizer_groups_follow_the_trainer():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    opt = T.build_optimizer(
        model, "adamw", 1e-3, decay=checkpoints.decay_parameter_names(model), weight_decay=0.1
    )
    decay, no_decay = (g["param_names"] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(not n.endswith("bias") and ".ln_" not in n for n in decay)
    assert all(n.endswith("bias") or ".ln_" in n or n.startswith("transformer.ln_f") for n in no_decay)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(decay + no_decay) == sorted(names)
    assert decay == [n for n in names if n in decay]  # named_parameters order inside each group


# ----------------------------------------------------------------------------------------------- runs


def test_resume_is_identical_to_an_uninterrupted_run(data, tmp_path):
    """Stop at checkpoint-4, continue to step 8 in another folder: the same parameters and Adam moments,
    bit for bit (warmup + cosine, so the learning rate must also resume by step)."""
    kw = {"lr_schedule": "cosine", "warmup": 2}
    full = tr.train(config(data, tmp_path / "full", **kw))
    resumed = tr.train(config(data, tmp_path / "resumed", init=str(full / "checkpoint-4"), **kw))
    a, b = params(full / "checkpoint-8"), params(resumed / "checkpoint-8")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    oa = torch.load(full / "checkpoint-8" / "optimizer.pt", weights_only=True)
    ob = torch.load(resumed / "checkpoint-8" / "optimizer.pt", weights_only=True)
    for i, state in oa["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], ob["state"][i][key])
    ha = json.loads((full / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    hb = json.loads((resumed / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    assert ha == hb
    # and the stopped run differs from the finished one (the test is not vacuous)
    c = params(full / "checkpoint-4")
    assert not all(torch.equal(a[n], c[n]) for n in a)


class RecordingStream(T.DomainStream):
    """A stream that remembers which blocks it handed out."""

    def __init__(self, stream: T.DomainStream) -> None:
        super().__init__(stream.name, stream.blocks, stream.seed, stream.position)
        self.drawn: list[int] = []

    def indices(self, n: int) -> torch.Tensor:
        idx = super().indices(n)
        self.drawn += idx.tolist()
        return idx


def test_branches_from_a_checkpoint(data, tmp_path):
    """validate's load_state + fork + run: a branch with the run's own schedule reproduces the run exactly;
    a branch with other weights reads the same per-domain streams, only more or less of them."""
    full = tr.train(config(data, tmp_path / "full"))
    opts = V.ValidateOptions(checkpoint=full / "checkpoint-4", domains=domain_args(data), lr=3e-3, steps=2)
    state = V.load_state(V.resolve_setup(opts, note=lambda _t: None))
    assert (state.step, state.batch_size, [s.position for s in state.streams]) == (4, 8, [24, 8])
    same, other = state.fork(), state.fork()
    for branch in (same, other):
        branch.streams = [RecordingStream(s) for s in branch.streams]
    lr = lambda step: 3e-3  # noqa: E731
    same.run(Schedule.constant({"en": 0.75, "ru": 0.25}), 4, lr)
    expected = params(full / "checkpoint-8")
    for name, p in same.model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name
    other.run(Schedule.constant({"en": 1.0, "ru": 0.0}), 4, lr)
    assert other.step == 8 and [s.position for s in other.streams] == [24 + 32, 8]
    assert not torch.equal(other.model.transformer.wte.weight, same.model.transformer.wte.weight)
    assert len(same.streams[0].drawn) == 24 and other.streams[0].drawn[:24] == same.streams[0].drawn
    assert other.streams[1].drawn == [] and len(same.streams[1].drawn) == 8
    assert state.step == 4 and [s.position for s in state.streams] == [24, 8]  # forks left it alone


def test_checkpoint_files_and_manifest(data, tmp_path):
    out = tr.train(config(data, tmp_path / "run", optimizer="adamw", weight_decay=0.01))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4",
        "checkpoint-8",
    ]
    ck = out / "checkpoint-8"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (ck / name).is_file(), name
    assert not (ck / "training_args.bin").exists()
    assert "lm_head.weight" not in params(ck)  # tied to the embedding, stored once
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    assert len(opt["param_groups"]) == 2 and opt["param_groups"][0]["weight_decay"] == 0.01
    assert all("exp_avg_sq" in s for s in opt["state"].values())
    rng = torch.load(ck / "rng_state.pth", weights_only=True)
    assert {"python", "numpy", "cpu"} <= set(rng)

    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["max_steps"] == 8
    train_logs = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in train_logs] == [2, 4, 6, 8]
    assert all(e["learning_rate"] == 3e-3 and {"loss_en", "loss_ru"} <= set(e) for e in train_logs)
    evals = [e for e in state["log_history"] if "eval_en_loss" in e]
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert all(e["eval_ru_loss"] > 0 for e in evals)
    cs = json.loads((ck / "commute_state.json").read_text())
    assert cs["positions"] == {"en": 6 * 8, "ru": 2 * 8}  # 8 rows: 6 en + 2 ru per step

    manifest = json.loads((out / "commute.json").read_text())
    assert manifest["format"] == "commute-manifest/1"
    assert manifest["schedule"] == [{"step": 0, "weights": {"en": 0.75, "ru": 0.25}}]
    assert manifest["tokenizer"] == "tokenizer" and (out / "tokenizer" / "tokenizer.json").is_file()
    assert manifest["optimizer"] == {
        "name": "adamw",
        "lr": 3e-3,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.01,
    }
    assert (manifest["seq_len"], manifest["batch_size"], manifest["seed"]) == (32, 8, 0)
    assert "domains" not in manifest  # the data lives outside the run folder: not a manifest path
    assert set(manifest["external_sources"]["domains"]) == {"en", "ru"}

    # the analyzer's readers accept what we wrote
    adam = checkpoints.load_adam_state(ck, checkpoints.load_model(ck))
    assert adam is not None and adam.layout == "param_names" and adam.step == 8
    refs = checkpoints.discover(out)
    assert [r.step for r in refs] == [4, 8]
    assert checkpoints.learning_rate(refs[-1]) == 3e-3
    assert checkpoints.read_manifest(out).tokenizer == (out / "tokenizer").resolve()


def test_refuses_to_mix_runs(data, tmp_path):
    out = tr.train(config(data, tmp_path / "run", steps=4))
    with pytest.raises(CommuteError, match="already holds checkpoints"):
        tr.train(config(data, out, steps=4))
    # continuing in place from its own last checkpoint is fine
    tr.train(config(data, out, steps=6, init=str(out / "checkpoint-4"), save_every=2))
    assert (out / "checkpoint-6").is_dir()


# ----------------------------------------------------------------------------------------------- CLI


def domain_args(root: Path, split: str = "train") -> list[str]:
    return [f"{lang}={root}/{lang}/{split}.jsonl" for lang in ("en", "ru")]


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("step,en,ru\n0,1.2,-0.2\n", "negative weight"),
        ("step,en,ru\n0,0.7,0.2\n", "sum to 0.9"),
        ("step,en,de\n0,0.8,0.2\n", "unknown domain de"),
        ('[{"step": 5, "weights": {"en": 0.8, "ru": 0.2}}]', "starts at step 5"),
    ],
)
def test_cli_rejects_bad_schedules(data, tmp_path, capsys, content, message):
    sched = tmp_path / "sched.txt"
    sched.write_text(content)
    args = ["train", str(tmp_path / "out"), "--domains", *domain_args(data)]
    code = run_cli([*args, "--tokenizer", str(TOKENIZER), "--schedule", str(sched), "--steps", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_cli_rejects_bad_weights(data, tmp_path, capsys):
    args = ["train", str(tmp_path / "out"), "--domains", *domain_args(data)]
    assert run_cli([*args, "--tokenizer", str(TOKENIZER), "--weights", "en=0.9", "ru=0.2"]) == 2
    assert "sum to 1.1" in capsys.readouterr().err


def test_cli_trains_with_a_piecewise_schedule_and_manifest(data, tmp_path):
    """Data inside the run folder: the manifest names it relative to the folder, so a second run can
    reuse it with --manifest."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for lang in ("en", "ru"):
        (run / "data" / lang).mkdir()
        for split in ("train", "validation"):
            (run / "data" / lang / f"{split}.jsonl").write_text((data / lang / f"{split}.jsonl").read_text())
    sched = tmp_path / "s.csv"
    sched.write_text("step,en,ru\n0,0.5,0.5\n2,0.75,0.25\n")
    d = run / "data"
    code = run_cli(
        [
            *["train", str(run), "--domains", *domain_args(d)],
            *["--eval-domains", *domain_args(d, "validation")],
            *["--tokenizer", str(TOKENIZER), "--schedule", str(sched), "--steps", "3", "--save-every", "3"],
            *["--batch-size", "4", "--seq-len", "32", "--init", str(data / "tiny.json"), "--quiet"],
        ]
    )
    assert code == 0
    manifest = json.loads((run / "commute.json").read_text())
    assert manifest["domains"] == {"en": "data/en/train.jsonl", "ru": "data/ru/train.jsonl"}
    assert manifest["eval_domains"] == {"en": "data/en/validation.jsonl", "ru": "data/ru/validation.jsonl"}
    assert manifest["schedule"][1] == {"step": 2, "weights": {"en": 0.75, "ru": 0.25}}
    cs = json.loads((run / "checkpoint-3" / "commute_state.json").read_text())
    assert cs["positions"] == {"en": 2 + 2 + 3, "ru": 2 + 2 + 1}

    code = run_cli(
        [
            *["train", str(tmp_path / "again"), "--manifest", str(run), "--weights", "en=1", "ru=0"],
            *["--steps", "1", "--batch-size", "2", "--seq-len", "32"],
            *["--init", str(data / "tiny.json"), "-q"],
        ]
    )
    assert code == 0
    again = json.loads((tmp_path / "again" / "commute.json").read_text())
    assert set(again["external_sources"]["domains"]) == {"en", "ru"}


def test_cli_help():
    proc = subprocess.run(
        [sys.executable, "-m", "commute_cli", "train", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "--schedule" in proc.stdout and "--save-every" in proc.stdout


# ----------------------------------------------------------------------------------------------- samples


def sample_checkpoints() -> list[Path]:
    found = [p for p in SAMPLES.glob("checkpoint-*") if p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def test_samples_size_limit():
    out = subprocess.run(["du", "-sk", str(SAMPLES)], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[0]) <= 30 * 1024


def test_samples_load_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpts = sample_checkpoints()
    assert 4 <= len(ckpts) <= 6
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    assert tok.eos_token == "<|endoftext|>" and len(tok) == 4096
    assert tok.decode(tok("Привет, world")["input_ids"]) == "Привет, world"
    for ck in ckpts:
        model = AutoModelForCausalLM.from_pretrained(str(ck), local_files_only=True)
        assert model.config.vocab_size == len(tok)
        assert AutoTokenizer.from_pretrained(str(ck), local_files_only=True).get_vocab() == tok.get_vocab()
    manifest = json.loads((SAMPLES / "commute.json").read_text())
    assert manifest["domains"] == {"en": "data/en/train.jsonl", "ru": "data/ru/train.jsonl"}
    assert manifest["eval_domains"] == {"en": "data/en/validation.jsonl", "ru": "data/ru/validation.jsonl"}
    assert manifest["schedule"] == [{"step": 0, "weights": {"en": 0.8, "ru": 0.2}}]
    assert manifest["tokenizer"] == "tokenizer"


def _letters(path: Path, limit: int = 200_000) -> tuple[int, int, int]:
    cyr = lat = total = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            for ch in json.loads(line)["text"]:
                if ch.isalpha():
                    total += 1
                    cyr += "\u0400" <= ch <= "\u04ff"
                    lat += ch.isascii()
            if total > limit:
                break
    return cyr, lat, total


@pytest.mark.parametrize("split", ["train", "validation"])
def test_sample_shards_are_the_right_language(split):
    cyr, _, total = _letters(SAMPLES / "data" / "ru" / f"{split}.jsonl")
    assert cyr / total > 0.85
    _, lat, total = _letters(SAMPLES / "data" / "en" / f"{split}.jsonl")
    assert lat / total > 0.99
    for lang in ("en", "ru"):
        size = (SAMPLES / "data" / lang / f"{split}.jsonl").stat().st_size
        assert (500_000 if split == "train" else 50_000) < size < (2_500_000 if split == "train" else 250_000)


def test_sample_validation_loss_decreases():
    """Logged at every save on the whole validation shard; recomputed here for the last checkpoint."""
    ckpts = sample_checkpoints()
    history = json.loads((ckpts[-1] / "trainer_state.json").read_text())["log_history"]
    evals = {e["step"]: e for e in history if "eval_en_loss" in e}
    steps = [int(p.name.split("-")[1]) for p in ckpts]
    for lang in ("en", "ru"):
        losses = [evals[s][f"eval_{lang}_loss"] for s in steps]
        assert all(b < a for a, b in itertools.pairwise(losses)), (lang, losses)

    from commute_cli.io.documents import load_texts
    from commute_cli.io.sampling import pack_blocks

    tok = checkpoints.load_tokenizer(TOKENIZER)
    model = checkpoints.load_model(ckpts[-1])
    blocks = {
        lang: pack_blocks(load_texts(f"data/{lang}/validation.jsonl", base_dir=SAMPLES), tok, 128)[:256]
        for lang in ("en", "ru")
    }
    recomputed = T.evaluate(model, blocks)
    for lang in ("en", "ru"):
        assert recomputed[lang] == pytest.approx(evals[steps[-1]][f"eval_{lang}_loss"], abs=1e-4)


def test_make_samples_script_is_the_documented_command():
    script = (REPO / "scripts" / "make_samples.sh").read_text().replace("\\\n", " ")
    readme = (SAMPLES / "README.md").read_text().replace("\\\n", " ")
    command = next(line for line in script.splitlines() if line.startswith("commute train"))
    assert " ".join(command.split()) in " ".join(readme.split())
    assert os.access(REPO / "scripts" / "make_samples.sh", os.X_OK)


def test_a_continuation_inherits_the_runs_optimizer_settings_unless_given(data, tmp_path):
    """Unset optimizer settings come from the run's manifest (a continuation trains as the run did); a flag
    given wins; without a manifest the defaults stay."""
    from commute_cli.commands.train_setup import inherit_training
    from commute_cli.io import checkpoints

    run = tr.train(config(data, tmp_path / "run", lr=2e-3, weight_decay=0.1, lr_schedule="cosine", warmup=2))
    manifest = checkpoints.read_manifest(run)
    unset = ("lr", "optimizer", "weight_decay", "lr_schedule", "warmup")
    got = inherit_training(config(data, tmp_path / "next", unset=unset), manifest)
    assert (got.lr, got.weight_decay, got.lr_schedule, got.warmup, got.optimizer) == (
        2e-3,
        0.1,
        "cosine",
        2,
        "adamw",
    )
    kept = inherit_training(config(data, tmp_path / "next", lr=5e-4, unset=unset[1:]), manifest)
    assert kept.lr == 5e-4 and kept.weight_decay == 0.1
    assert inherit_training(config(data, tmp_path / "next", unset=unset), None).lr == 3e-3
