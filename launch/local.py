r"""Local multi-process launcher: N CPU processes on localhost, each with emulated devices, one jax.distributed job.

  python -m launch.local --processes=2 --devices_per_process=4 -- \
      --config=experiments/configs/tiny_cpu.py --workdir=/tmp/mp

Everything after `--` goes to `python -m experiments.train`. The tests use it to check that 2 processes x 4
devices give the same losses as 1 process x 8 devices. --dry_run prints the commands instead.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

from absl import app, flags

_PROCESSES = flags.DEFINE_integer('processes', 2, 'Processes to start.')
_DEVICES = flags.DEFINE_integer('devices_per_process', 4, 'Emulated CPU devices per process.')
_PORT = flags.DEFINE_integer('port', 0, 'Coordinator port (0 = pick a free one).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands and exit.')
_MODULE = flags.DEFINE_string('module', 'experiments.train', 'Python module each process runs.')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def commands(processes: int, devices: int, port: int, module: str, args: list[str]) -> list[tuple[dict, list]]:
  """(environment additions, argv) of every process."""
  out = []
  for pid in range(processes):
    env = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    argv = [sys.executable, '-m', module, *args, f'--config.distributed.coordinator=127.0.0.1:{port}',
            f'--config.distributed.num_processes={processes}', f'--config.distributed.process_id={pid}']
    out.append((env, argv))
  return out


def start(processes: int, devices: int, args: list[str], port: int = 0,
          module: str = 'experiments.train') -> list[subprocess.Popen]:
  """Starts every process of the job (stdout/stderr piped); returns them running."""
  port = port or free_port()
  return [subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for env, argv in commands(processes, devices, port, module, args)]


def launch(processes: int, devices: int, args: list[str], port: int = 0, module: str = 'experiments.train',
           timeout: float | None = None) -> list[subprocess.CompletedProcess]:
  """Runs the job to the end; the processes' results."""
  procs = start(processes, devices, args, port, module)
  results = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  return results


def main(argv):
  args = argv[1:]
  if _DRY_RUN.value:
    for env, cmd in commands(_PROCESSES.value, _DEVICES.value, _PORT.value or 12355, _MODULE.value, args):
      print(' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items()), shlex.join(cmd))
    return
  results = launch(_PROCESSES.value, _DEVICES.value, args, _PORT.value, _MODULE.value)
  for i, r in enumerate(results):
    print(f'--- process {i}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-3000:] if r.returncode else ""}')
  if any(r.returncode for r in results):
    raise SystemExit(1)


if __name__ == '__main__':
  app.run(main)
