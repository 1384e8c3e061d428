"""The uptraining loop: load + convert, shard, train with KD and early-exit losses, log, checkpoint, resume.

The workdir is a local path or a URI (gs://bucket/run: what a multi-host pod needs); every workdir access goes
through etils.epath and Orbax.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from rrt_jax import presets
from rrt_jax.checkpoint import as_path, is_uri
from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.convert import to_recursive
from rrt_jax.model import Decoder, init_variables
from rrt_jax.train import flops
from rrt_jax.train.checkpointing import TrainCheckpoints
from rrt_jax.train.optimizer import learning_rate_schedule, make_optimizer
from rrt_jax.train.sharding import global_batch, make_mesh, replicated, variable_shardings
from rrt_jax.train.step import LossConfig, init_state, make_train_step

log = logging.getLogger(__name__)
EOS_ID = 2  # End of sequence for both tokenizers (SmolLM2's <|im_end|>, ByteTokenizer's 2).


def recursion_config(c: ml_collections.ConfigDict) -> RecursionConfig:
  r = c.recursion
  return RecursionConfig(loops=r.loops, looping=r.looping, init=r.init, norm_init=r.norm_init,
                         lora_rank=r.lora_rank or None, lora_alpha=r.lora_alpha or None,
                         lora_targets=r.lora_targets, lora_init=r.lora_init, relax_vectors=r.relax_vectors,
                         seed=c.train.seed)


def load_original(c: ml_collections.ConfigDict, vocab_size: int) -> tuple[ModelConfig, dict]:
  """The original (teacher) model: the packaged SmolLM2, an HF checkpoint, or a random preset (variables
  None: random models are initialised directly into their shardings by `initial_variables`)."""
  m = c.model
  if m.source == 'smollm2':
    from rrt_jax.convert.gguf import load_gguf
    cfg, variables = load_gguf()
  elif m.source == 'hf':
    if not m.path:
      raise ValueError('model.source=hf needs --config.model.path=/path/to/hf_checkpoint_dir.')
    from rrt_jax.convert.hf import load_hf
    cfg, variables = load_hf(m.path)
  elif m.source == 'random':
    cfg, variables = presets.get(m.preset).replace(vocab_size=vocab_size), None
  else:
    raise ValueError(f'Unknown model.source {m.source!r}: choose smollm2, hf or random.')
  return cfg.replace(dtype=m.dtype, remat=m.remat), variables


def make_tokenizer(name: str):
  if name == 'smollm2':
    from rrt_jax.convert.gguf import load_tokenizer
    return load_tokenizer()
  if name == 'bytes':
    from rrt_jax.data.byte_tokenizer import ByteTokenizer
    return ByteTokenizer()
  raise ValueError(f'Unknown data.tokenizer {name!r}: choose smollm2 or bytes.')


def init_distributed(c: ml_collections.ConfigDict) -> None:
  """jax.distributed for multi-process runs: distributed.coordinator 'host:port' with num_processes and
  process_id, or 'auto' for jax's own cluster detection (Cloud TPU pods, SLURM, ...); empty = one process."""
  d = c.distributed
  if not d.coordinator:
    return
  if os.environ.get('JAX_PLATFORMS') == 'cpu':  # (Asking jax for its backend here would initialise it.)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Cross-process CPU collectives.
  if d.coordinator == 'auto':
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                               process_id=d.process_id)


def tensorboard_unsupported(logdir: str) -> str | None:
  """Why tensorboardX cannot write event files under `logdir`, or None if it can (local paths; gs:// and s3://
  when their client libraries are installed)."""
  if not is_uri(logdir):
    return None
  from tensorboardX import record_writer
  scheme = logdir.split('://', 1)[0]
  needs = {'gs': ('GCS_ENABLED', 'google-cloud-storage'), 's3': ('S3_ENABLED', 'boto3')}
  if scheme not in needs:
    return f'tensorboardX writes no {scheme}:// paths'
  flag, package = needs[scheme]
  if not getattr(record_writer, flag, False):
    return f'tensorboardX needs {package} for {scheme}:// paths (pip install {package})'
  return None


class MetricsWriter:
  """metrics.jsonl and TensorBoard event files in the workdir (process 0 only).

  Object stores (gs://) neither append nor show a file before it is closed, so in a remote workdir metrics.jsonl is
  rewritten whole (earlier runs' lines kept) and the events are uploaded at most every `sync_every_s` seconds and on
  close; locally both are flushed at every write."""

  def __init__(self, workdir: str, sync_every_s: float = 60.0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self._path = as_path(workdir) / 'metrics.jsonl'
    self._remote = is_uri(workdir)
    self._sync_every_s, self._synced_at, self._unsynced = sync_every_s, time.monotonic(), False
    if self._remote:
      self._text = self._path.read_text() if self._path.exists() else ''
    else:
      self._jsonl = self._path.open('a')
    logdir = str(as_path(workdir) / 'tensorboard')
    reason = tensorboard_unsupported(logdir)
    if reason is None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir)
    else:
      self._tb = None
      log.warning('no TensorBoard events in %s: %s; metrics.jsonl has the same scalars', logdir, reason)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps({'step': step, **scalars}) + '\n'
    if self._remote:
      self._text, self._unsynced = self._text + line, True
      if time.monotonic() - self._synced_at >= self._sync_every_s:
        self._sync()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      if not self._remote:  # (tensorboardX re-uploads a remote events file whole at each flush.)
        self._tb.flush()

  def _sync(self) -> None:
    if self._unsynced:
      self._path.write_text(self._text)
      if self._tb is not None:
        self._tb.flush()
    self._synced_at, self._unsynced = time.monotonic(), False

  def close(self) -> None:
    if not self.enabled:
      return
    if self._remote:
      self._sync()
    else:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and stops at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM received: saving a checkpoint and stopping')
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _scalars(metrics: dict) -> dict:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
    else:
      out.update({f'{k}/loop{i + 1}': float(x) for i, x in enumerate(v)})
  return out


def initial_variables(c: ml_collections.ConfigDict, cfg: ModelConfig, rec: RecursionConfig, vanilla: dict | None,
                      mesh, use_teacher: bool) -> tuple[dict, dict | None]:
  """(student, teacher) variables placed with their shardings. Pretrained weights are converted on the host
  and each leaf is placed sharded; random weights are created sharded (no full copy on one device)."""
  student_shardings = variable_shardings(cfg, rec, mesh)
  teacher_shardings = variable_shardings(cfg, RecursionConfig(), mesh)
  if vanilla is None:
    key = jax.random.key(c.train.seed)
    student = init_variables(cfg, rec, key, student_shardings)
    if not use_teacher:  # (A random teacher is its own draw: the student does not depend on it.)
      return student, None
    teacher = init_variables(cfg, RecursionConfig(), jax.random.fold_in(key, 1), teacher_shardings)
  else:
    student = jax.device_put(to_recursive(vanilla, cfg, rec), student_shardings)
    teacher = jax.device_put(vanilla, teacher_shardings)
  return student, teacher if use_teacher else None


def data_iterators(c: ml_collections.ConfigDict, source, tokenizer, max_seq_len: int) -> list:
  """This process's iterators: data.shards virtual shards (0 = one per process) split over the processes, so
  the global batch is the same whatever the number of hosts (rows of shard i are rows i*b .. (i+1)*b - 1)."""
  from rrt_jax.data.pipeline import PipelineConfig, lm_dataset
  shards = c.data.shards or jax.process_count()
  if shards % jax.process_count():
    raise ValueError(f'data.shards={shards} must be a multiple of the {jax.process_count()} processes.')
  if c.data.global_batch % shards:
    raise ValueError(f'data.global_batch={c.data.global_batch} must divide over data.shards={shards}.')
  if c.data.global_batch % c.train.grad_accum:
    raise ValueError(f'data.global_batch={c.data.global_batch} must be a multiple of train.grad_accum.')
  per_process = shards // jax.process_count()
  config = PipelineConfig(c.data.seq_len, c.data.global_batch // shards, seed=c.data.seed,
                          worker_count=c.data.worker_count)
  first = jax.process_index() * per_process
  return [iter(lm_dataset(source, tokenizer, config, eos_id=EOS_ID, max_seq_len=max_seq_len, shard_index=i,
                          shard_count=shards)) for i in range(first, first + per_process)]


def train(c: ml_collections.ConfigDict, workdir: str, source=None, tokenizer=None,
          stop_after: int | None = None) -> list[dict]:
  """Runs uptraining; returns the logged metrics. `source`/`tokenizer` override the TFDS split and SmolLM2
  tokenizer (tests); `stop_after` stops (with a checkpoint) after that many steps of this run."""
  from rrt_jax.data.pipeline import CheckpointableIterator
  init_distributed(c)
  as_path(workdir).mkdir(parents=True, exist_ok=True)
  if tokenizer is None:
    tokenizer = make_tokenizer(c.data.tokenizer)
  if source is None:
    from rrt_jax.data.tfds_builder import text_source
    source = text_source(c.data.split)

  mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  cfg, vanilla = load_original(c, tokenizer.get_vocab_size())
  rec = recursion_config(c)
  log.info('model %s, %s; mesh %s', cfg.family, rec, dict(mesh.shape))

  use_teacher = c.loss.kd_weight > 0
  student_vars, teacher_vars = initial_variables(c, cfg, rec, vanilla, mesh, use_teacher)
  del vanilla

  schedule = learning_rate_schedule(c.train.lr, c.train.steps, c.train.warmup_steps, c.train.decay,
                                    c.train.end_lr_ratio)
  tx = make_optimizer(schedule, b1=c.train.b1, b2=c.train.b2, weight_decay=c.train.weight_decay,
                      clip_norm=c.train.clip_norm, freeze_shared=c.train.freeze_shared)
  # Optimizer moments are zeros_like(variables): sharding propagation gives them the variables' shardings.
  state = jax.jit(lambda v: init_state(v, tx))(student_vars)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  del student_vars

  loss_cfg = LossConfig(c.loss.ce_weight, c.loss.kd_weight, c.loss.temperature, c.loss.early_exit,
                        c.loss.exit_alpha, c.loss.kd_target)
  teacher = Decoder(cfg) if use_teacher else None
  step_fn = jax.jit(make_train_step(Decoder(cfg, rec), teacher, tx, loss_cfg, c.train.grad_accum),
                    donate_argnums=(0,), out_shardings=(state_shardings, replicated(mesh)))

  data_iter = CheckpointableIterator(data_iterators(c, source, tokenizer, cfg.max_seq_len))

  ckpts = TrainCheckpoints(workdir, c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.async_save)
  ckpts.write_configs(workdir, cfg, rec)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
  restored = ckpts.restore_latest(abstract, data_iter)
  if restored is not None:
    start_step, state = restored
    log.info('resumed from step %d', start_step)

  flops_per_token = flops.train_flops_per_token(cfg, rec, c.data.seq_len, exits=rec.loops,
                                                teacher=cfg if use_teacher else None)
  peak = flops.measured_matmul_peak(cfg.dtype) * jax.device_count()
  writer = MetricsWriter(workdir)
  preemption = _Preemption()
  history, last_good = [], int(state.step)
  first = int(state.step)
  end = c.train.steps if stop_after is None else min(c.train.steps, first + stop_after)
  try:
    from tqdm import tqdm
    bar = tqdm(range(first, end), initial=first, total=c.train.steps, unit='step',
               disable=jax.process_index() != 0, dynamic_ncols=True)
    t0, timed_from = time.perf_counter(), first
    for step in bar:
      batch = global_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, teacher_vars, batch)
      done = step + 1
      if done == first + 1:
        jax.block_until_ready(state)
        t0, timed_from = time.perf_counter(), done
      if done % c.log_every == 0 or done == end:
        scalars = _scalars(metrics)
        if not math.isfinite(scalars['loss']):
          ckpts.wait()
          raise FloatingPointError(
              f'loss is {scalars["loss"]} at step {done}: stopping. The last good checkpoint is step '
              f'{last_good} in {ckpts.directory}; lower train.lr or raise train.warmup_steps and resume.')
        scalars.pop('tokens')
        jax.block_until_ready(state)
        now = time.perf_counter()
        # Throughput since the previous log, excluding the first step of the run (compilation).
        timed_steps = done - max(timed_from, first + 1)
        tokens_per_s = timed_steps * c.data.global_batch * c.data.seq_len / (now - t0) if timed_steps else 0.0
        t0, timed_from = now, done
        scalars.update(lr=float(schedule(done)), tokens_per_s=tokens_per_s,
                       mfu=tokens_per_s * flops_per_token / peak)
        scalars = {k: v for k, v in scalars.items() if not k.startswith('exit_weights')}
        writer.write(done, scalars)
        history.append({'step': done, **scalars})
        bar.set_postfix(loss=f'{scalars["loss"]:.3f}', tok_s=f'{tokens_per_s:,.0f}', mfu=f'{scalars["mfu"]:.1%}')
      if ckpts.save(done, state, data_iter):
        last_good = done
      if preemption.requested:
        ckpts.save(done, state, data_iter, force=True)
        break
    else:
      ckpts.save(end, state, data_iter, force=True)
  finally:
    preemption.restore()
    ckpts.close()
    writer.close()
  return history
