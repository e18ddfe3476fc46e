#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: the CPU build of torch first, so that
# the package's bare `torch` requirement cannot pull a multi-GB CUDA build, then commute with its test
# extra at the versions the tests pass with (constraints.txt). Idempotent; says what it is doing (a fresh setup downloads ~1 GB and takes 1-3 minutes).
#   TORCH_SPEC   what to install for torch (default: torch==2.13.0, the CPU build on this machine's disk;
#                on a GPU box use e.g. TORCH_SPEC="torch" or your CUDA wheel)
#   VENV         where the environment lives (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PY="${PYTHON:-python3}"

say() { printf 'bootstrap: %s\n' "$*" >&2; }
started=$SECONDS
say "checking $VENV (torch, commute) ..."
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
pip_q() {
  local log
  log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  say "installing $TORCH_SPEC (the largest download: about a minute) ..."
  pip_q "$TORCH_SPEC"
  say "torch installed ($((SECONDS - started)) s so far)"
fi
if ! "$VENV/bin/python" -c "import commute_cli, pytest, hypothesis" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.commute-installed" ] || [ constraints.txt -nt "$VENV/.commute-installed" ]; then
  say "installing commute and its dependencies (transformers, datasets, ...; up to a minute) ..."
  pip_q -e ".[test]" -c constraints.txt
  touch "$VENV/.commute-installed"
  say "commute installed ($((SECONDS - started)) s so far)"
else
  say "everything is already installed"
fi
"$VENV/bin/python" -c "import torch, commute_cli; print(f'commute {commute_cli.__version__} ready (torch {torch.__version__}) in $VENV')"
