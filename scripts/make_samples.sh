#!/usr/bin/env bash
# Rebuild sample_checkpoints/ from scratch: the data shards and tokenizer (scripts/build_shards.py, which
# downloads two Debian packages with apt-get), then ONE training run of a tiny GPT-2 on en + ru with the
# constant 0.8/0.2 mixture. Takes a few minutes on one CPU core; prints the folder size and the validation
# losses at every checkpoint (the table in sample_checkpoints/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PATH="$PWD/.venv/bin:$PATH"; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python scripts/build_shards.py

cd sample_checkpoints
commute train . \
  --domains en=data/en/train.jsonl ru=data/ru/train.jsonl \
  --eval-domains en=data/en/validation.jsonl ru=data/ru/validation.jsonl \
  --tokenizer tokenizer --weights en=0.8 ru=0.2 \
  --steps 2500 --save-every 500 --batch-size 10 --seq-len 128 \
  --lr 1e-3 --optimizer adamw --lr-schedule constant --seed 0 --threads 1 --overwrite
cd ..

du -sh sample_checkpoints
python - <<'PY'
import json, pathlib
root = pathlib.Path("sample_checkpoints")
last = max(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
history = json.loads((last / "trainer_state.json").read_text())["log_history"]
print("| step | en validation loss | ru validation loss |\n|---|---|---|")
for e in history:
    if "eval_en_loss" in e:
        print(f"| {e['step']} | {e['eval_en_loss']:.4f} | {e['eval_ru_loss']:.4f} |")
PY
