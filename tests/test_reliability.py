"""Faults and bad inputs of a training run end in a resume with nothing lost or in one clear error naming the fix:
a changed config in an old workdir, unreadable checkpoints, non-finite losses between log steps, failing saves, two
trainers on one workdir, reruns with fewer steps, metrics of discarded steps, an indivisible batch."""

import errno
import json
import os

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity
from tiny_config import tiny_config

from rrt_jax.checkpoint import CheckpointError, load_training_checkpoint
from rrt_jax.pretrained.byte_tokenizer import ByteTokenizer
from rrt_jax.train.loop import train
from rrt_jax.train.validate import ConfigError, check_config, check_mesh
from rrt_jax.utils.locking import LockHeld, file_lock

TEXT = [{'text': f'Sentence number {i} says something about faults and how a run survives them.'}
        for i in range(64)]


def tiny(**overrides):
  return tiny_config(**{'data.seq_len': 32, **overrides})


def run(c, workdir, **kwargs):
  return train(c, str(workdir), source=TEXT, tokenizer=ByteTokenizer(), **kwargs)


def saved_steps(workdir):
  return sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())


def damage(directory):
  for path in directory.rglob('*'):
    if path.is_file():
      path.write_bytes(b'garbage')


def metric_steps(workdir):
  return [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


# Same-shape change (cycle -> sequence) in the slow set: the default run keeps the shape-changing one.
@pytest.mark.parametrize('change', [{'recursion.lora_rank': 4},
                                    pytest.param({'recursion.looping': 'sequence'}, marks=pytest.mark.slow)])
def test_a_changed_model_config_in_an_old_workdir_is_refused(tmp_path, change):
  run(tiny(**{'train.steps': 2, 'checkpoint.every_steps': 2}), tmp_path)
  before = (tmp_path / 'model_config.json').read_text()
  key, value = next(iter(change.items()))
  message = rf'holds checkpoints \(up to step 2\) of another model: {key}: .* new --workdir'
  with pytest.raises(ValueError, match=message):
    run(tiny(**{'train.steps': 4, **change}), tmp_path)
  assert (tmp_path / 'model_config.json').read_text() == before  # Not overwritten: the old run still loads.
  assert json.loads((tmp_path / 'config.json').read_text())['train']['steps'] == 2  # The run's own config too.
  assert load_training_checkpoint(tmp_path)[2] == 2


def test_resuming_with_another_tokenizer_of_the_same_size_is_refused(tmp_path):
  from rrt_jax.pretrained.tokenizer import make_tokenizer
  run(tiny(**{'train.steps': 2, 'checkpoint.every_steps': 2}), tmp_path)
  other = make_tokenizer('synthetic:259')
  assert other.get_vocab_size() == ByteTokenizer().get_vocab_size()  # Same size: the shapes alone cannot tell.
  with pytest.raises(ValueError, match=r"data.tokenizer: the workdir records tokenizer 'bytes'; this run uses "
                                       r"'synthetic:259'.* new --workdir"):
    train(tiny(**{'train.steps': 4}), str(tmp_path), source=TEXT, tokenizer=other)
  assert run(tiny(**{'train.steps': 3, 'checkpoint.every_steps': 1}), tmp_path)[0]['step'] == 3  # Same one: resumes.


def test_generate_uses_the_tokenizer_the_workdir_records(tmp_path):
  import subprocess
  import sys
  run(tiny(**{'train.steps': 1, 'checkpoint.every_steps': 1}), tmp_path)
  out = subprocess.run([sys.executable, '-m', 'experiments.generate', f'--workdir={tmp_path}', '--prompt=ab',
                        '--max_new_tokens=2'], capture_output=True, text=True, timeout=600, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'tokenizer bytes (recorded with the model)' in out.stdout
  assert "'ab' -> " in out.stdout


def test_unreadable_checkpoints_are_moved_aside_and_the_retrained_steps_saved(tmp_path, caplog):
  c = tiny(**{'train.steps': 4, 'log_every': 1, 'checkpoint.every_steps': 2, 'checkpoint.keep': 5})
  full = run(c, tmp_path / 'full')
  run(c, tmp_path / 'run')
  damage(tmp_path / 'run' / 'checkpoints' / '4' / 'state')
  with caplog.at_level('ERROR'):  # A notebook reading the workdir falls back too, with the reason logged.
    assert load_training_checkpoint(tmp_path / 'run')[2] == 2
  assert 'could not be read' in caplog.text
  resumed = run(c, tmp_path / 'run')
  assert [h['step'] for h in resumed] == [3, 4]
  assert [h['loss'] for h in resumed] == [h['loss'] for h in full[2:]]  # Resumed exactly from step 2.
  assert (tmp_path / 'run' / 'checkpoints.unreadable' / '4').is_dir()  # Kept for inspection, no longer latest.
  assert saved_steps(tmp_path / 'run') == [2, 4]  # The retrained step 4 was saved again.
  assert load_training_checkpoint(tmp_path / 'run')[2] == 4
  assert metric_steps(tmp_path / 'run') == [1, 2, 3, 4]  # The discarded step 3, 4 rows are gone, not doubled.


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
  c = tiny(**{'train.steps': 2, 'checkpoint.every_steps': 2})
  run(c, tmp_path)
  damage(tmp_path / 'checkpoints' / '2' / 'state')
  with pytest.raises(CheckpointError, match=r'no checkpoint in .* restores \(steps \[2\]'):
    run(tiny(**{'train.steps': 4}), tmp_path)
  with pytest.raises(CheckpointError, match='can be read'):
    load_training_checkpoint(tmp_path)


def tamper(state_dir, change):
  """Rewrites a saved TrainState with `change` applied to its first LoRA-free float array: valid files holding
  other values, as bit flips on disk leave them (Orbax reads them back without complaint)."""
  import shutil

  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(state_dir)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  index = next(i for i, (path, x) in enumerate(leaves)
               if 'variables' in jax.tree_util.keystr(path) and np.asarray(x).dtype == np.float32)
  arrays = [x for _, x in leaves]
  arrays[index] = change(np.array(arrays[index]))
  tmp = state_dir.parent / 'state.tampered'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp, jax.tree_util.tree_unflatten(treedef, arrays))
    ckptr.wait_until_finished()
  shutil.rmtree(state_dir)
  tmp.rename(state_dir)


def flip_a_bit(x):
  bits = x.view(np.uint32).copy()
  bits.flat[0] ^= np.uint32(1 << 12)  # A low mantissa bit: still finite, barely different.
  return bits.view(np.float32)


def make_nan(x):
  x.flat[:3] = np.nan
  return x


@pytest.mark.parametrize('change', [flip_a_bit, pytest.param(make_nan, marks=pytest.mark.slow)])
def test_bit_flips_in_checkpoint_data_are_detected_and_the_previous_step_used(tmp_path, caplog, change):
  c = tiny(**{'train.steps': 4, 'log_every': 1, 'checkpoint.every_steps': 2, 'checkpoint.keep': 5})
  full = run(c, tmp_path / 'full')
  run(c, tmp_path / 'run')
  tamper(tmp_path / 'run' / 'checkpoints' / '4' / 'state', change)
  with caplog.at_level('WARNING'):  # Readers (generate, export, eval, the notebook) fall back, saying so.
    assert load_training_checkpoint(tmp_path / 'run')[2] == 2
  assert 'damaged' in caplog.text and 'loaded step 2' in caplog.text
  with pytest.raises(CheckpointError, match=r'the checkpoint of step 4 can be read.*damaged.*Other steps there: \[2\]'):
    load_training_checkpoint(tmp_path / 'run', 4)  # Asked for by name: an error, never the damaged values.
  resumed = run(c, tmp_path / 'run')  # Training resumes from the intact step 2 and retrains step 4.
  assert [h['step'] for h in resumed] == [3, 4]
  assert [h['loss'] for h in resumed] == [h['loss'] for h in full[2:]]
  assert (tmp_path / 'run' / 'checkpoints.unreadable' / '4').is_dir()
  assert load_training_checkpoint(tmp_path / 'run')[2] == 4


@pytest.mark.parametrize('every_steps', [1, 0])
def test_a_non_finite_loss_between_log_steps_is_never_checkpointed(tmp_path, every_steps):
  c = tiny(**{'train.lr': 1e30, 'train.warmup_steps': 0, 'train.clip_norm': 0.0, 'log_every': 100,
              'train.steps': 8, 'checkpoint.every_steps': every_steps})
  expected = 'last good checkpoint is step' if every_steps else 'No checkpoint was saved before it'
  with pytest.raises(FloatingPointError, match=rf'not finite at step \d.*{expected}'):
    run(c, tmp_path)
  for step in saved_steps(tmp_path) if every_steps else []:
    _, variables, _ = load_training_checkpoint(tmp_path, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables)), step


def test_a_failed_save_stops_the_run_at_once_naming_it(tmp_path, monkeypatch):
  real = atomicity.on_commit_callback

  async def disk_full(tmp_dir, **kwargs):
    if tmp_dir.get_final().name == '4':
      raise OSError(errno.ENOSPC, 'No space left on device')
    await real(tmp_dir, **kwargs)

  monkeypatch.setattr(atomicity, 'on_commit_callback', disk_full)
  c = tiny(**{'train.steps': 40, 'log_every': 1, 'checkpoint.every_steps': 2})
  with pytest.raises(CheckpointError, match=r'step 4 .* No space left on device.* resumes from step 2'):
    run(c, tmp_path)
  assert max(metric_steps(tmp_path)) <= 6  # Raised at the next step or the next save, not at the end.
  monkeypatch.setattr(atomicity, 'on_commit_callback', real)
  assert run(c, tmp_path, stop_after=1)[0]['step'] == 3


def test_a_second_trainer_on_a_workdir_is_refused(tmp_path):
  with file_lock(tmp_path / '.lock'), pytest.raises(LockHeld, match=f'another --workdir.*locked by pid {os.getpid()}'):
    run(tiny(), tmp_path)
  assert not (tmp_path / 'checkpoints').exists()


def test_a_rerun_with_fewer_steps_changes_nothing(tmp_path):
  run(tiny(**{'train.steps': 4, 'checkpoint.every_steps': 2, 'checkpoint.keep': 1}), tmp_path)
  assert run(tiny(**{'train.steps': 2, 'checkpoint.every_steps': 2, 'checkpoint.keep': 1}), tmp_path) == []
  assert saved_steps(tmp_path) == [4]
  assert load_training_checkpoint(tmp_path)[2] == 4


def test_bad_values_are_collected_in_one_error():
  c = tiny(**{'log_every': 0, 'checkpoint.keep': 0, 'data.global_batch': 6, 'train.grad_accum': 4,
              'model.source': 'hf', 'data.tokenizer': 'gpt2'})
  with pytest.raises(ConfigError) as e:
    check_config(c, '')
  text = str(e.value)
  for fragment in ('log_every=0, checkpoint.keep=0', 'model.source=hf needs --config.model.path',
                   'global_batch=6 is not a multiple of train.grad_accum=4', "data.tokenizer='gpt2'",
                   '--workdir is empty'):
    assert fragment in text, text
  with pytest.raises(ConfigError, match=r'global_batch=6 does not split over the 4 batch devices .* multiple of 4'):
    check_mesh(tiny(**{'data.global_batch': 6, 'mesh.data': 4}), 4)
  check_mesh(tiny(**{'data.global_batch': 8, 'mesh.data': 2, 'mesh.tensor': 2}), 4)


def test_a_model_that_does_not_split_over_the_mesh_is_named():
  from jax.sharding import AbstractMesh

  from rrt_jax import presets
  from rrt_jax.config import RecursionConfig
  from rrt_jax.sharding import check_divisible
  cfg, rec = presets.get('tiny_llama').replace(vocab_size=259), RecursionConfig(loops=2, lora_rank=8)
  check_divisible(cfg, rec, AbstractMesh((2, 4, 1), ('data', 'fsdp', 'tensor')))
  with pytest.raises(ValueError, match=r"\['embedding'\] \(259, 64\): 259 over mesh tensor=2.*mesh.tensor=1"):
    check_divisible(cfg, rec, AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor')))


def test_a_missing_model_path_is_one_config_error(tmp_path):
  with pytest.raises(ConfigError) as e:
    check_config(tiny(**{'model.source': 'hf', 'model.path': str(tmp_path / 'none')}))
  assert len(e.value.problems) == 1 and 'has no config.json' in e.value.problems[0]


def test_the_clis_report_an_unreadable_workdir_in_one_line(tmp_path):
  import subprocess
  import sys
  run(tiny(**{'train.steps': 2, 'checkpoint.every_steps': 1}), tmp_path)
  for step in (1, 2):
    damage(tmp_path / 'checkpoints' / str(step) / 'state')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args in (['experiments.evaluate', f'--workdir={tmp_path}', '--tasks='],
               ['experiments.evaluate', f'--workdir={tmp_path}', '--tasks=', '--step=2'],
               ['experiments.export', f'--workdir={tmp_path}', f'--out={tmp_path / "out"}', '--step=2']):
    out = subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, timeout=600, check=False,
                         cwd=root)
    assert out.returncode == 1, (args, out.stderr[-2000:])
    last = out.stderr.strip().splitlines()[-1]
    assert 'can be read' in last and 'Traceback' not in out.stderr, (args, out.stderr[-2000:])
    assert len(out.stderr.splitlines()) < 20, (args, len(out.stderr.splitlines()))
