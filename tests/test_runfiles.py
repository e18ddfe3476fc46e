"""The run folder and the one resolver of run inputs: what ``train`` writes, what analyze/validate/train
read back, the one loader's security checks on every path, and interruptions (real SIGINT to the real
console script)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from commute_cli.cli import main
from commute_cli.commands import analyze as A
from commute_cli.commands import train as tr
from commute_cli.commands import validate as V
from commute_cli.engine.training import lr_at
from commute_cli.errors import CommuteError
from commute_cli.io import runfiles

from cli_runner import terminal_sigint
from tiny_run import make_run

REPO = Path(__file__).resolve().parent.parent
COMMUTE = Path(sys.executable).parent / "commute"
SHIPPED_TOKENIZER = REPO / "sample_checkpoints" / "tokenizer"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("rf") / "run", steps=(0, 20), seed=0, n_docs=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """en/ru training text from the shipped shards (~15k characters each) and a tiny model config."""
    root = tmp_path_factory.mktemp("data")
    for lang in ("en", "ru"):
        lines, total = [], 0
        with (REPO / "sample_checkpoints" / "data" / lang / "train.jsonl").open(encoding="utf-8") as f:
            for line in f:
                lines.append(line)
                total += len(line)
                if total > 15_000:
                    break
        (root / f"{lang}.jsonl").write_text("".join(lines), encoding="utf-8")
    (root / "tiny.json").write_text(json.dumps({"n_layer": 1, "n_embd": 16, "n_head": 2}))
    return root


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return out


def commute(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(COMMUTE), *map(str, args)], capture_output=True, text=True, env=env(), cwd=cwd, timeout=300
    )


def cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as ex:
        return int(ex.code or 0)
    return 0


def train_args(data: Path, out: Path, *extra) -> list[str]:
    return [
        *["train", out, "--domains", f"en={data / 'en.jsonl'}", f"ru={data / 'ru.jsonl'}"],
        *["--tokenizer", SHIPPED_TOKENIZER, "--init", data / "tiny.json", "--seq-len", "32"],
        *["--batch-size", "4", "--weights", "en=0.75", "ru=0.25", "--device", "cpu", *extra],
    ]


# ----------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("layout", ["manifest", "bare"])
def test_analyze_validate_and_train_resolve_the_same_tokenizer_and_seq_len(run, tmp_path, layout):
    """One resolver: for the same checkpoint and flags the three commands use the same tokenizer and
    sequence length. 'bare': an HF-Trainer-like checkpoint (its own tokenizer files, no commute.json, no
    commute_state.json, n_positions 32), where validate used to train at 128 and analyze to use 32."""
    if layout == "manifest":
        ckpt = run / "checkpoint-20"  # manifest next to it: seq_len 16, tokenizer/ folder
        want_seq, want_tok = 16, (run / "tokenizer").resolve()
    else:
        ckpt = tmp_path / "solo" / "checkpoint-20"
        shutil.copytree(run / "checkpoint-20", ckpt)
        for f in (run / "tokenizer").iterdir():
            shutil.copy(f, ckpt / f.name)
        want_seq, want_tok = 32, ckpt.resolve()
    domains = [f"en={run / 'data' / 'en.jsonl'}", f"xx={run / 'data' / 'xx.jsonl'}"]
    weights = ["en=0.7", "xx=0.3"]
    a = A.resolve_inputs(A.AnalyzeOptions(ckpt_dir=ckpt, domains=domains, weights=weights))
    v = V.resolve_setup(
        V.ValidateOptions(checkpoint=ckpt, domains=domains, weights=weights, lr=0.01, steps=2),
        lambda _t: None,
    )
    assert (Path(a.tokenizer_path).resolve(), a.seq_len) == (want_tok, want_seq)
    assert (Path(v.tokenizer_path).resolve(), v.seq_len) == (want_tok, want_seq)
    # train --init the checkpoint: one more step, at the resolved length, with the resolved tokenizer
    out = tr.train(
        tr.TrainConfig(
            out_dir=tmp_path / "cont",
            domains=dict(d.split("=", 1) for d in domains),
            weights=weights,
            init=str(ckpt),
            steps=21,
            batch_size=4,
            quiet=True,
        )
    )
    state = json.loads((out / "checkpoint-21" / "commute_state.json").read_text())
    assert state["seq_len"] == want_seq
    copied = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert copied == json.loads((want_tok / "tokenizer.json" if want_tok.is_dir() else want_tok).read_text())


WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "jumps", "over"]
WORDPIECE += ["lazy", "dog", ";", "."]


def tokenizer_layouts(root: Path) -> dict[str, Path]:
    """Tokenizer folders as trainers leave them: the fast tokenizer.json (what transformers saves today), a
    WordPiece vocab.txt with its config (older BERT-style saves), and a config without any vocabulary."""
    fast, wordpiece, config_only = root / "fast", root / "wordpiece", root / "config_only"
    for folder in (fast, wordpiece, config_only):
        folder.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED_TOKENIZER / f, fast / f)
    (wordpiece / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    config = json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    (wordpiece / "tokenizer_config.json").write_text(config)
    (config_only / "tokenizer_config.json").write_text(config)
    return {"fast": fast, "wordpiece": wordpiece, "config_only": config_only}


@pytest.mark.parametrize("layout", ["fast", "wordpiece", "config_only"])
def test_one_tokenizer_check_and_what_it_accepts_travels_with_a_checkpoint(tmp_path, layout):
    """has_tokenizer (which the resolver of run inputs asks of a checkpoint) says yes exactly when
    load_tokenizer loads the folder, and copy_tokenizer_files (what train puts in each checkpoint) carries
    a tokenizer that loads the same."""
    from commute_cli.io import tokenizer as tk

    folder = tokenizer_layouts(tmp_path)[layout]
    loadable = layout != "config_only"
    assert tk.has_tokenizer(folder) is loadable
    if not loadable:
        with pytest.raises(CommuteError, match="no tokenizer files"):
            tk.load_tokenizer(folder)
        return
    source = tk.load_tokenizer(folder)
    copy = tmp_path / "copy"
    runfiles.copy_tokenizer_files(folder, copy)
    assert tk.has_tokenizer(copy)
    text = "the quick brown fox jumps over the lazy dog."
    assert tk.load_tokenizer(copy)(text)["input_ids"] == source(text)["input_ids"]


def saved_model(folder: Path) -> Path:
    """A tiny GPT-2 written by ``save_pretrained`` alone (config.json, model.safetensors): no
    trainer_state.json, so its step is only in the folder's name."""
    from transformers import GPT2LMHeadModel

    from commute_cli.io.tokenizer import load_tokenizer

    from tiny_run import tiny_config

    torch.manual_seed(0)
    vocab = len(load_tokenizer(SHIPPED_TOKENIZER))
    GPT2LMHeadModel(tiny_config(vocab, n_positions=32)).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("name", ["checkpoint-500", "step-500", "step_500", "iter-500", "global_step500"])
def test_a_checkpoint_step_is_read_from_every_folder_form(tmp_path, name):
    """One step parser: train's resume (read_training_state) and analyze's discovery agree on the step of
    a model folder named in any of the forms trainers use, with no trainer_state.json to say it."""
    from commute_cli.io import discovery

    folder = saved_model(tmp_path / name)
    assert not (folder / "trainer_state.json").exists()
    assert runfiles.read_training_state(folder).step == 500
    assert [r.step for r in discovery.discover(folder)] == [500]


def test_train_init_from_a_step_named_folder_resumes_at_its_step(data, tmp_path):
    """`commute train --init .../step-500` continues at step 500, it does not start again at 0."""
    init = saved_model(tmp_path / "step-500")
    out = tmp_path / "cont"
    args = [*train_args(data, out, "--steps", "502", "--save-every", "2", "-q")]
    args[args.index("--init") + 1] = init
    assert cli(*args) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-502"]
    state = json.loads((out / "checkpoint-502" / "trainer_state.json").read_text())
    assert state["global_step"] == 502


def test_a_damaged_run_file_is_one_line_that_names_it(tmp_path):
    """One JSON reader (io.safefiles.read_json) for every file of a run folder: a damaged file is a one-line
    error that says which file it is; a file that holds no JSON object reads as empty."""
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / runfiles.STATE_NAME).write_text("{not json")
    with pytest.raises(CommuteError, match=r"could not read commute state .*commute_state\.json"):
        runfiles.read_training_state(folder)
    (folder / runfiles.STATE_NAME).write_text("[1, 2]")
    assert runfiles.read_commute_state(folder) == {}
    (folder / "trainer_state.json").write_text("{not json")
    with pytest.raises(CommuteError, match=r"could not read trainer state .*trainer_state\.json"):
        runfiles.read_training_state(folder)
    (tmp_path / runfiles.INCOMPLETE_NAME).write_text("{not json")
    with pytest.raises(CommuteError, match=r"could not read the interrupted-run marker .*commute-incomplete"):
        runfiles.check_complete(tmp_path)


def test_train_then_analyze_finds_the_manifest_with_data_outside_the_run(data, tmp_path):
    """`commute analyze OUT` with no flags after `commute train OUT` on data outside OUT: the manifest
    records the data by absolute path (external_sources), and analyze uses it."""
    out = tmp_path / "run"
    assert cli(*train_args(data, out, "--steps", "4", "--save-every", "2", "-q")) == 0
    manifest = json.loads((out / "commute.json").read_text())
    assert "domains" not in manifest and set(manifest["external_sources"]["domains"]) == {"en", "ru"}
    res = commute("analyze", out, "--samples", "12", "--blocks", "2", "--quiet", "--out", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    assert "records data outside the run folder (training: " in " ".join(res.stderr.split())
    rows = (tmp_path / "o" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("run_id,step,") and len(rows) > 1
    # the data moved away: a one-line error that says what to pass
    (data / "ru.jsonl").rename(data / "ru.moved")
    try:
        res = commute("analyze", out, "--samples", "12", "--blocks", "2", "--quiet", "--out", tmp_path / "p")
    finally:
        (data / "ru.moved").rename(data / "ru.jsonl")
    assert res.returncode == 2 and "no longer exist" in res.stderr and "--domains" in res.stderr


def test_trainer_state_is_written_through_transformers(data, tmp_path):
    from transformers import TrainerState

    out = tr.train(tr.TrainConfig(**_config(data, tmp_path / "r"), steps=2, save_every=2))
    state = TrainerState.load_from_json(str(out / "checkpoint-2" / "trainer_state.json"))
    assert state.global_step == 2 and state.max_steps == 2 and state.train_batch_size == 4
    assert [e["step"] for e in state.log_history if "loss" in e] == [2]


def test_cosine_rates_match_transformers_after_the_warmup():
    """lr_at's cosine is transformers' get_cosine_schedule_with_warmup after the warmup (during it,
    commute is one step ahead so that the first update is not at rate 0: documented in lr_at)."""
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=50)
    for step in range(50):
        if step >= 5:
            assert lr_at(step, 1.0, "cosine", 50, 5) == pytest.approx(sched.get_last_lr()[0], abs=1e-12)
        else:
            assert lr_at(step, 1.0, "cosine", 50, 5) == pytest.approx((step + 1) / 5)
        opt.step()
        sched.step()


def _config(data: Path, out: Path) -> dict:
    return {
        "out_dir": out,
        "domains": {"en": str(data / "en.jsonl"), "ru": str(data / "ru.jsonl")},
        "tokenizer": str(SHIPPED_TOKENIZER),
        "init": str(data / "tiny.json"),
        "seq_len": 32,
        "batch_size": 4,
        "quiet": True,
    }


# ----------------------------------------------------------------------------------------------- security


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_pickle_payload_is_refused_by_validate_and_train_init(run, tmp_path, where):
    """validate and train --init load through the one loader: a code payload in pytorch_model.bin or
    optimizer.pt is refused in one line (exit 2) and never runs."""
    evil = tmp_path / "evil"
    shutil.copytree(run, evil)
    ckpt = evil / "checkpoint-20"
    marker = tmp_path / "PWNED"
    if where == "model":
        state = {"weights": _Payload(marker)}
        (ckpt / "model.safetensors").unlink()
        torch.save(state, ckpt / "pytorch_model.bin")
    else:
        torch.save(
            {"state": {0: {"exp_avg_sq": _Payload(marker)}}, "param_groups": []}, ckpt / "optimizer.pt"
        )
    for args in (
        ["validate", ckpt, "--lr", "0.01", "--horizon", "2", "--repeats", "1", "--out", tmp_path / "o"],
        ["train", tmp_path / "t", "--init", ckpt, "--steps", "21", "--batch-size", "4", "-q"],
    ):
        res = commute(*args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, res.stderr)
        assert "Traceback" not in res.stderr
        assert not marker.exists(), f"the payload ran ({args[0]})"


# ----------------------------------------------------------------------------------------------- interrupts


def _interrupt(args: list, ready, timeout: float = 240) -> subprocess.CompletedProcess:
    """Start the console script, wait until ``ready()``, send SIGINT (Ctrl-C), collect it."""
    proc = subprocess.Popen(
        [str(COMMUTE), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        preexec_fn=terminal_sigint,
    )  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()[1][-500:]}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_in_train_keeps_checkpoints_marks_the_run_and_says_how_to_resume(data, tmp_path):
    out = tmp_path / "run"
    res = _interrupt(
        train_args(data, out, "--steps", "100000", "--save-every", "3"),
        lambda: (out / "checkpoint-3").is_dir(),
    )
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    last = max((p for p in out.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    assert f"--init {last}" in res.stderr and "resume" in res.stderr, res.stderr
    assert not (out / "commute.json").exists()  # no manifest: the run is not complete
    assert not list(out.glob(".checkpoint-*"))  # no half-written checkpoint
    # later commands refuse the incomplete run, with the command that resumes it
    with pytest.raises(CommuteError, match="incomplete") as err:
        runfiles.check_complete(out)
    assert f"--init {last}" in (err.value.hint or "")
    res = commute("analyze", out, "--out", tmp_path / "o", "--quiet")
    assert res.returncode == 2 and "incomplete" in res.stderr and "--init" in res.stderr
    # the printed command resumes it; then the run is complete
    command = res.stderr.split("resume it: ", 1)[1].rstrip(")\n").split()
    step = int(last.name.split("-")[1])
    command[command.index("--steps") + 1] = str(step + 3)
    assert cli(*command[1:], "-q") == 0
    assert (out / "commute.json").is_file() and not (out / runfiles.INCOMPLETE_NAME).exists()
    runfiles.check_complete(out)


def test_ctrl_c_in_validate_keeps_finished_repeats_and_resumes(run, tmp_path):
    out = tmp_path / "v"
    args = ["validate", run / "checkpoint-20", "--lr", "0.01", "--horizon", "30", "--repeats", "50"]
    args += ["--out", out, "--device", "cpu"]
    res = _interrupt(args, lambda: len(list((out / "cache").glob("validate-*.json"))) >= 1)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    assert "repeats finished and are cached" in res.stderr and "same command again" in res.stderr, res.stderr
    assert "validate: 50 repeat(s) x 3 branches x 60 steps = 9000 training steps" in res.stderr
    assert not (out / "validate.csv").exists()
    cached = len(list((out / "cache").glob("validate-*.json")))
    notes: list[str] = []
    opts = V.ValidateOptions(checkpoint=run / "checkpoint-20", lr=0.01, steps=30, repeats=cached, out=out)
    V.run_validate(opts, note=notes.append)
    assert any(f"all {cached} repeats are cached" in n for n in notes), notes


# ----------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("core/mixing.py", ("commute_cli.core", "commute_cli.errors")),
        ("engine/training.py", ("commute_cli.core", "commute_cli.errors")),
        ("engine/models.py", ("commute_cli.core", "commute_cli.errors")),
        (
            "io/runfiles.py",
            ("commute_cli.core", "commute_cli.errors", "commute_cli.io", "commute_cli.__init__"),
        ),
        ("io/run_inputs.py", ("commute_cli.core", "commute_cli.errors", "commute_cli.io")),
        (
            "commands/train.py",
            (
                "commute_cli.core",
                "commute_cli.errors",
                "commute_cli.engine",
                "commute_cli.io",
                "commute_cli.render",
                "commute_cli.commands.train_setup",
                "commute_cli.commands.options",  # --watch: analyze's options and the watch service
                "commute_cli.commands.watch",
            ),
        ),
        (
            "commands/train_setup.py",
            ("commute_cli.core", "commute_cli.errors", "commute_cli.engine", "commute_cli.io"),
        ),
    ],
)
def test_the_split_modules_keep_the_layer_rule(module, allowed):
    """core imports nothing of the package (errors excepted) and no torch; engine and io import only core;
    commands import the layers below, never another command or the CLI."""
    import ast

    tree = ast.parse((REPO / "commute_cli" / module).read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module if node.module != "commute_cli" else "commute_cli.__init__")
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    ours = {n for n in names if n.startswith("commute_cli")}
    assert all(n.startswith(allowed) for n in ours), (module, sorted(ours))
    if module.startswith("core/"):
        assert not {n for n in names if n.split(".")[0] in ("torch", "transformers", "pathlib", "os")}, names
