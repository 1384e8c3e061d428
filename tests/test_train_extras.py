"""While training: the held-out eval equals the standalone per-loop perplexity of the saved checkpoints (also on a
2-device mesh), the profiler writes a trace, W&B gets the metrics.jsonl rows (a fake wandb module), config.json
holds the whole config, bad values fail in check_config, and a tiny CLI run prints only our lines.

One in-process run (module fixture) serves most tests; the CLI run is a subprocess started before it, so the two
overlap."""

import glob
import json
import logging
import math
import os
import re
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
from tiny_config import tiny_config as tiny

from rrt_jax.checkpoint import load_training_checkpoint
from rrt_jax.data.tfds_builder import text_source
from rrt_jax.eval.perplexity import heldout_windows, per_loop_perplexity
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.train.loop import train
from rrt_jax.train.metrics import WANDB_ID_FILE, MetricsWriter
from rrt_jax.train.validate import ConfigError, check_config
from rrt_jax.utils.logs import quiet_libraries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_TOKENS, EVAL_BATCH, SEQ_LEN = 512, 4, 64  # tiny_cpu's data.seq_len.
CLI_FLAGS = ('--config.train.steps=10', '--config.mesh.data=1', '--config.mesh.fsdp=2', '--config.eval_every=5',
             f'--config.eval.tokens={EVAL_TOKENS}')


class FakeWandb:
  """What the writer calls of wandb: init(**kwargs) -> a run with log(row, step=) and finish()."""

  def __init__(self):
    self.inits, self.logged, self.finished = [], [], 0
    self.module = types.ModuleType('wandb')
    self.module.init = self.init

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return types.SimpleNamespace(log=lambda row, step: self.logged.append((step, dict(row))), finish=self.finish)

  def finish(self):
    self.finished += 1


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
  """A 10-step CLI run on 2 emulated CPU devices (fsdp=2) with eval every 5 steps: (workdir, Popen)."""
  workdir = tmp_path_factory.mktemp('cli')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.train', '--config=experiments/configs/tiny_cpu.py',
                           f'--workdir={workdir}', *CLI_FLAGS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope='module')
def run(cli_run, tmp_path_factory):
  """4 steps: log every 3, eval every 2 (rows 2: eval only, 3: training only, 4: both), checkpoints at 2 and 4,
  a trace of step 2, W&B into a fake module: (config, workdir, history, fake wandb)."""
  del cli_run  # (Started first.)
  config = tiny(**{'train.steps': 4, 'log_every': 3, 'eval_every': 2, 'eval.tokens': EVAL_TOKENS,
                   'eval.batch': EVAL_BATCH, 'checkpoint.every_steps': 2, 'profile.start_step': 2, 'profile.steps': 1,
                   'wandb.project': 'rrt-test', 'wandb.name': 'tiny'})
  workdir = tmp_path_factory.mktemp('run')
  fake = FakeWandb()
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, 'wandb', fake.module)
    history = train(config, str(workdir), source=text_source('validation'), tokenizer=ByteTokenizer())
  return config, workdir, history, fake


def rows(workdir) -> dict[int, dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {row.pop('step'): row for row in map(json.loads, f)}


def standalone_perplexity(workdir, step: int, batch: int) -> list[float]:
  model, variables, _ = load_training_checkpoint(workdir, step)
  return per_loop_perplexity(model, variables, heldout_windows(ByteTokenizer(), 'validation', EVAL_TOKENS, SEQ_LEN),
                             batch)


def eval_values(row: dict, kind: str) -> list[float]:
  return [row[f'eval/{kind}/loop{i}'] for i in (1, 2)]


def test_eval_rows_equal_the_standalone_perplexity_of_the_checkpoints(run):
  _, workdir, history, _ = run
  logged = rows(workdir)
  assert sorted(logged) == [2, 3, 4] and [h['step'] for h in history] == [2, 3, 4]
  assert set(logged[2]) == {f'eval/{k}/loop{i}' for k in ('loss', 'ppl') for i in (1, 2)}  # An eval-only row.
  assert 'loss' in logged[3] and not any(k.startswith('eval/') for k in logged[3])
  assert 'loss' in logged[4] and set(logged[2]) <= set(logged[4])
  for step in (2, 4):
    ppl = standalone_perplexity(workdir, step, EVAL_BATCH)
    np.testing.assert_allclose(eval_values(logged[step], 'ppl'), ppl, rtol=1e-5)
    np.testing.assert_allclose(eval_values(logged[step], 'loss'), [math.log(p) for p in ppl], rtol=1e-5)
  assert eval_values(logged[4], 'loss') != eval_values(logged[2], 'loss')  # The model trained in between.


def tensorboard_tags(logdir) -> set[str]:
  """Scalar tags of tensorboardX event files (TFRecord framing: length, crc, Event proto, crc)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    data = open(path, 'rb').read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      pos += 12 + length + 4
  return tags


def test_eval_scalars_reach_tensorboard_as_name_slash_loop(run):
  tags = tensorboard_tags(run[1] / 'tensorboard')
  assert {'eval/loss/loop1', 'eval/loss/loop2', 'eval/ppl/loop1', 'eval/ppl/loop2', 'loss'} <= tags


def test_the_profiler_writes_a_trace_tensorboard_reads(run):
  traces = glob.glob(str(run[1] / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert traces and os.path.getsize(traces[0]) > 0


def test_wandb_gets_the_metrics_rows_at_their_steps(run):
  config, workdir, _, fake = run
  (init,) = fake.inits
  assert init['project'] == 'rrt-test' and init['name'] == 'tiny' and init['resume'] == 'allow'
  assert init['id'] == (workdir / WANDB_ID_FILE).read_text() and init['dir'] == str(workdir)
  assert init['config'] == json.loads(config.to_json_best_effort())
  assert fake.logged == sorted(rows(workdir).items()) and fake.finished == 1


def test_config_json_round_trips_to_the_whole_config(run):
  config, workdir, _, _ = run
  with open(workdir / 'config.json') as f:
    saved = json.load(f)
  assert saved == config.to_dict()
  assert saved['eval_every'] == 2 and saved['wandb']['project'] == 'rrt-test' and saved['model']['preset']
  assert not glob.glob(str(workdir / '*.tmp*'))  # (atomic_write_text's temporary file is gone.)


def test_a_missing_wandb_names_pip_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` raises ImportError.
  with pytest.raises(ImportError, match='pip install wandb'):
    MetricsWriter(str(tmp_path), wandb_init={'project': 'p'})
  assert not (tmp_path / 'metrics.jsonl').exists()  # Nothing opened before the failure.


def test_bad_values_fail_in_check_config(monkeypatch):
  import importlib.util
  find_spec = importlib.util.find_spec
  monkeypatch.delitem(sys.modules, 'wandb', raising=False)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else find_spec(name, *a))
  with pytest.raises(ConfigError) as e:
    check_config(tiny(**{'eval_every': -1, 'eval.split': 'valdation', 'eval.tokens': 0, 'profile.start_step': 0,
                         'wandb.project': 'p'}))
  text = str(e.value)
  for expected in ('eval_every=-1', "eval.split='valdation'", 'profile.start_step=0', 'pip install wandb'):
    assert expected in text, text
  check_config(tiny(**{'eval_every': 10, 'profile.start_step': 5}))  # Good values pass.


def test_quiet_libraries_drops_library_info_and_keeps_their_warnings(caplog):
  absl_logger = logging.getLogger('absl')

  def emitted(level, path):
    caplog.clear()
    absl_logger.handle(logging.LogRecord('absl', level, path, 1, 'line', None, None))
    return len(caplog.records)

  orbax_file = '/x/site-packages/orbax/checkpoint/checkpoint_manager.py'
  with caplog.at_level(logging.INFO):
    quiet_libraries()
    try:
      quiet_libraries()  # Idempotent.
      assert emitted(logging.INFO, orbax_file) == 0
      assert emitted(logging.WARNING, orbax_file) == 1
      assert emitted(logging.INFO, '/work/main/rrt_jax/train/loop.py') == 1
      assert logging.getLogger('orbax').level == logging.WARNING
    finally:
      quiet_libraries(False)
    assert emitted(logging.INFO, orbax_file) == 1 and logging.getLogger('orbax').level == logging.NOTSET


def test_a_tiny_cli_run_prints_our_lines_only_and_evaluates_exactly_on_a_sharded_mesh(cli_run):
  workdir, proc = cli_run
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-3000:]
  # (text=True reads tqdm's carriage returns as newlines: every refresh of the bar is a line, a log line may follow
  # a refresh on the same line.)
  record = re.compile(r'([IWE])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ')
  progress = re.compile(r'^\s*\d+%\|')
  ours = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'rrt_jax', '**', '*.py'), recursive=True)}
  records = record.findall(out)
  assert {name for level, name in records if level == 'I'} <= ours, out  # No Orbax/grain/TFDS INFO line.
  other = [line for line in out.splitlines() if line.strip() and not progress.match(line) and not record.search(line)]
  # Ours: model, MFU, eval, checkpoint saved, the eval results, the summary (Orbax alone would add ~40 lines a
  # checkpoint).
  evals = [line for line in other if 'held-out perplexity per loop' in line]
  assert [line.split(':')[0].strip() for line in evals] == ['step 5', 'step 10'], out  # Results on the console.
  assert len(records) + len(other) <= 11, out
  assert other and other[-1].startswith('step 10: loss '), out
  logged = rows(workdir)
  assert [s for s, r in logged.items() if 'eval/ppl/loop1' in r] == [5, 10]
  # The eval ran on fsdp-sharded variables with the default batch (the 8-sequence micro-batch).
  np.testing.assert_allclose(eval_values(logged[10], 'ppl'), standalone_perplexity(workdir, 10, 8), rtol=1e-5)
