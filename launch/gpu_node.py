r"""Single-node multi-GPU launcher for experiments.train.

  # One process driving every local GPU through the mesh (--config.mesh.*; data=-1 takes all devices):
  python -m launch.gpu_node --gpus=0,1,2,3 -- --config=experiments/configs/smollm2.py:b3_r64_average \
      --workdir=workdir/smollm2 --config.model.dtype=bfloat16
  # One process per GPU, a jax.distributed job on this machine (as a multi-node job would run):
  python -m launch.gpu_node --mode=per_gpu --gpus=0,1,2,3 -- --config=... --workdir=...

Prints the commands (the default); --execute (or --nodry_run) runs them. per_gpu first builds the data
once (--prepare_data), so that the processes do not all build the same cache at once. Install the CUDA extra first
(RRT_EXTRAS=test,cuda bash scripts/setup.sh). Everything after `--` goes to `python -m experiments.train`.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time

from absl import app, flags

MODES = ('single', 'per_gpu')

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called only when run as a script, so that tests can import several launchers (their flag names
  overlap) without absl's duplicate-flag error."""
  flags.DEFINE_enum('mode', 'single', list(MODES), 'single: one process with all the GPUs in --gpus '
                    '(sharded by the mesh); per_gpu: one process per GPU, joined by jax.distributed.')
  flags.DEFINE_list('gpus', [], 'CUDA device indices to use, e.g. 0,1,2,3. Empty: every GPU that '
                    '`nvidia-smi -L` lists.')
  flags.DEFINE_integer('port', 0, 'per_gpu: jax.distributed coordinator port on 127.0.0.1 (0 = a free '
                       'port; the dry run shows 12355 then).')
  flags.DEFINE_string('module', 'experiments.train', 'Python module each process runs.')
  flags.DEFINE_bool('prepare_data', True, 'per_gpu: build the corpora and TFDS dataset (rrt_jax.data) once '
                    'before starting the processes, which would otherwise all build the same cache at once.')
  flags.DEFINE_bool('dry_run', True, 'Print the commands instead of running them (the default).')
  flags.DEFINE_bool('execute', False, 'Run the commands (same as --nodry_run).')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def detect_gpus() -> list[str]:
  """Indices of the GPUs nvidia-smi lists; [] without a driver."""
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30)
  except (FileNotFoundError, subprocess.TimeoutExpired):
    return []
  return [m.group(1) for m in re.finditer(r'^GPU (\d+):', out.stdout, re.M)] if out.returncode == 0 else []


def validate(mode: str, gpus: list[str], port: int, args: list[str]) -> None:
  """Raises ValueError with what to change."""
  if mode not in MODES:
    raise ValueError(f'--mode={mode!r}: choose one of {", ".join(MODES)}.')
  if not gpus:
    raise ValueError('No GPUs: nvidia-smi lists none (or is missing). Pass --gpus=0,1,... to choose them.')
  bad = [g for g in gpus if not g.isdigit()]
  if bad:
    raise ValueError(f'--gpus={",".join(gpus)}: {bad} are not CUDA device indices (0, 1, ...).')
  if len(set(gpus)) != len(gpus):
    raise ValueError(f'--gpus={",".join(gpus)} names a GPU twice.')
  if not 0 <= port <= 65535:
    raise ValueError(f'--port={port} must be in 0..65535.')
  if mode == 'per_gpu' and any(a.startswith('--config.distributed.') for a in args):
    raise ValueError('--mode=per_gpu sets --config.distributed.* itself: drop them after `--`.')


def commands(mode: str, gpus: list[str], port: int, module: str, args: list[str]) -> list[tuple[dict, list]]:
  """(environment additions, argv) of every process."""
  # JAX_PLATFORMS=cuda: a broken CUDA install fails at start instead of silently training on the CPU.
  if mode == 'single':
    return [({'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': ','.join(gpus)}, [sys.executable, '-m', module, *args])]
  out = []
  for pid, gpu in enumerate(gpus):
    # Each process sees only its GPU (as its device 0); jax.distributed joins them into one global mesh.
    env = {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': gpu}
    argv = [sys.executable, '-m', module, *args, f'--config.distributed.coordinator=127.0.0.1:{port}',
            f'--config.distributed.num_processes={len(gpus)}', f'--config.distributed.process_id={pid}']
    out.append((env, argv))
  return out


def prepare_data_command() -> tuple[dict, list]:
  return {'JAX_PLATFORMS': 'cpu'}, [sys.executable, '-c', 'from rrt_jax.data.tfds_builder import build; build()']


def format_commands(cmds: list[tuple[dict, list]]) -> str:
  return '\n'.join(' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items()) + ' ' + shlex.join(argv)
                   for env, argv in cmds)


def run(cmds: list[tuple[dict, list]], poll_s: float = 0.5) -> int:
  """Starts every process (output to this terminal); if one fails, stops the others, which would otherwise wait
  in collectives for it. Returns the first non-zero exit code, or 0."""
  procs = [subprocess.Popen(argv, env={**os.environ, **env}) for env, argv in cmds]
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c]
      if failed or all(c == 0 for c in codes):
        break
      time.sleep(poll_s)
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      p.wait()
  for i, c in enumerate(codes):
    print(f'--- process {i}: exit {c if c is not None else "stopped"}', file=sys.stderr)
  return failed[0] if failed else 0


def main(argv: list[str]) -> None:
  args = argv[1:]
  execute = FLAGS.execute or not FLAGS.dry_run
  gpus = FLAGS.gpus or detect_gpus()
  port = FLAGS.port or (free_port() if execute else 12355)
  try:
    validate(FLAGS.mode, gpus, FLAGS.port, args)
  except ValueError as e:
    raise SystemExit(f'launch.gpu_node: {e}\n(--help lists the flags.)') from e
  cmds = commands(FLAGS.mode, gpus, port, FLAGS.module, args)
  prepare = [prepare_data_command()] if FLAGS.mode == 'per_gpu' and FLAGS.prepare_data else []
  print(format_commands(prepare + cmds), flush=True)
  if not execute:
    return
  for env, argv in prepare:
    if subprocess.run(argv, env={**os.environ, **env}).returncode:
      raise SystemExit('launch.gpu_node: building the data failed (see above).')
  if code := run(cmds):
    raise SystemExit(code)


if __name__ == '__main__':
  define_flags()
  app.run(main)
