"""The uptraining loop: load + convert, shard, train with KD and early-exit losses, log, checkpoint, resume.

What it builds from the config is in train/setup.py, its metrics go through train/metrics.py, and checkpoints and
SIGTERM through train/checkpointing.py. The workdir is a local path or a URI (gs://bucket/run: what a multi-host pod
needs); every workdir access goes through etils.epath and Orbax.

Shapes: a batch is a dict of [global_batch, seq_len] arrays (rrt_jax/data/pipeline.py), sharded over the mesh's
('data', 'fsdp') axes; per-loop metrics are [loops] vectors, logged as '<name>/loop<i>'.

While training (all off by default): a held-out evaluation every `eval_every` steps (eval/loss/loop<i>,
eval/ppl/loop<i>; `heldout_evaluator`), a jax.profiler trace of a window of steps (`profile.*`; `StepProfiler`),
W&B as another metrics sink (`wandb.*`; train/metrics.py). The whole config goes to <workdir>/config.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rrt_jax.config import ModelConfig, RecursionConfig
from rrt_jax.model import Decoder
from rrt_jax.pretrained.tokenizer import check_vocab, tokenizer_for_model
from rrt_jax.sharding import RULES, check_divisible, global_batch, make_mesh, optimizer_shardings, replicated
from rrt_jax.train import flops, setup
from rrt_jax.train.checkpointing import Interrupted, Preemption, TrainCheckpoints
from rrt_jax.train.metrics import MetricsWriter, to_scalars
from rrt_jax.train.step import TrainState, init_state, make_train_step
from rrt_jax.train.validate import check_config, check_mesh
from rrt_jax.utils.locking import atomic_write_text, file_lock
from rrt_jax.utils.uri import as_path, is_uri

log = logging.getLogger(__name__)

CONFIG_JSON = 'config.json'  # In the workdir: the run's whole experiment config.


def train(c: ml_collections.ConfigDict, workdir: str, source=None, tokenizer=None,
          stop_after: int | None = None, student_variables: dict | None = None) -> list[dict]:
  """Runs uptraining; returns the logged metrics. `source`/`tokenizer` override the TFDS split and data.tokenizer
  (tests); `stop_after` stops (with a checkpoint) after that many steps of this run; `student_variables` (host
  arrays for Decoder(cfg, rec)) replace the conversion recipe (e.g. a model converted and healed elsewhere).

  The whole config is checked before anything is loaded or written (validate.py). A workdir is trained by one run
  at a time (a lock file). SIGTERM or Ctrl-C saves a checkpoint and raises `Interrupted`; a non-finite loss raises
  FloatingPointError before any checkpoint of it is written.

  Each returned row is {'step', ...} as in metrics.jsonl: the training scalars at log steps, eval/... at eval steps
  (a row of an eval step that is not a log step has only those). Library INFO logs (Orbax, grain, TFDS) follow the
  caller's logging configuration: rrt_jax.utils.logs.quiet_libraries() drops them (the CLI calls it)."""
  check_config(c, workdir)
  setup.init_distributed(c)
  check_mesh(c, jax.device_count())
  as_path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lock(workdir):
    return _train(c, workdir, source, tokenizer, stop_after, student_variables)


def train_state_shardings(variables: dict, tx: optax.GradientTransformation, trainable: tuple[str, ...] | None,
                          mesh: jax.sharding.Mesh) -> TrainState:
  """The TrainState's shardings: the variables' own (arrays or ShapeDtypeStructs with .sharding), the optimizer
  moments sharded as their variables (sharding.optimizer_shardings), the step replicated."""
  shapes = jax.eval_shape(lambda v: init_state(v, tx, trainable), variables)
  var_shardings = jax.tree.map(lambda x: x.sharding, variables)
  return TrainState(step=replicated(mesh), variables=var_shardings,
                    opt_state=optimizer_shardings(shapes.opt_state, var_shardings, variables, mesh))


def jit_train_step(c: ml_collections.ConfigDict, cfg: ModelConfig, rec: RecursionConfig,
                   tx: optax.GradientTransformation, trainable: tuple[str, ...] | None, state_shardings,
                   mesh: jax.sharding.Mesh):
  """The run's jitted step(state, teacher_variables, batch) -> (state, metrics): the state donated and kept in
  `state_shardings`, metrics replicated. It traces under the mesh and RULES, so the model's activation
  constraints (residual stream, logits) shard by the same table as the variables. experiments/plan.py compiles
  exactly this function ahead of time."""
  teacher = Decoder(cfg) if c.loss.kd_weight > 0 else None
  step = make_train_step(Decoder(cfg, rec), teacher, tx, setup.loss_config(c), c.train.grad_accum, trainable)

  def step_on_mesh(state, teacher_variables, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
      return step(state, teacher_variables, batch)

  return jax.jit(step_on_mesh, donate_argnums=(0,), out_shardings=(state_shardings, replicated(mesh)))


def workdir_lock(workdir: str):
  """One trainer per workdir: process 0 holds <workdir>/.lock (local workdirs; object stores have no locks)."""
  if jax.process_index() or is_uri(workdir):
    return contextlib.nullcontext()
  return file_lock(as_path(workdir) / '.lock', blocking=False,
                   what=f'training workdir {workdir}: another run is training into it; wait for it, stop it, or '
                        'choose another --workdir')


def _train(c: ml_collections.ConfigDict, workdir: str, source, tokenizer, stop_after: int | None,
           student_variables: dict | None) -> list[dict]:
  from rrt_jax.data.pipeline import CheckpointableIterator
  if tokenizer is None:
    tokenizer, _ = tokenizer_for_model(c.data.tokenizer, c.model.source, c.model.path)
  if source is None:
    from rrt_jax.data.sources import open_source  # '' (the default): text_source(c.data.split), as before.
    source = open_source(c.data.get('source', ''), c.data.split, c.data.get('text_field', 'text'))

  mesh = make_mesh(**c.mesh)
  cfg, vanilla = setup.load_original(c, tokenizer.get_vocab_size())
  check_vocab(tokenizer, cfg.vocab_size, f'model.source={c.model.source} {c.model.path or c.model.preset}')
  rec = setup.recursion_config(c)
  check_divisible(cfg, rec, mesh)
  log.info('model %s, %s; mesh %s', cfg.family, rec, dict(mesh.shape))

  use_teacher = c.loss.kd_weight > 0
  ckpts = TrainCheckpoints(workdir, **c.checkpoint)
  ckpts.check_configs(cfg, rec, tokenizer)  # Before the conversion recipe: a mismatch fails in seconds...
  write_config(c, workdir)  # ...and leaves the workdir's config.json as it was.
  if student_variables is None and vanilla is not None:
    # The conversion recipe (calibration, healing) runs only for a fresh run: a resumed run restores its state,
    # so the plain conversion is enough as a template.
    fresh = ckpts.latest_step() is None
    student_variables = setup.convert_student(c, cfg, rec, vanilla, source, tokenizer, workdir, recipe=fresh)
  student_vars, teacher_vars = setup.initial_variables(c, cfg, rec, vanilla, mesh, use_teacher, student_variables)
  del vanilla, student_variables

  schedule, tx = setup.optimizer(c)
  trainable = setup.trainable(c)  # Frozen shared weights: only LoRA is differentiated and has moments.
  state_shardings = train_state_shardings(student_vars, tx, trainable, mesh)
  state = jax.jit(lambda v: init_state(v, tx, trainable), out_shardings=state_shardings)(student_vars)
  del student_vars

  step_fn = jit_train_step(c, cfg, rec, tx, trainable, state_shardings, mesh)

  data_iter = CheckpointableIterator(setup.data_iterators(c, source, tokenizer, cfg.max_seq_len, cfg.vocab_size))

  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
  restored = ckpts.restore_latest(abstract, data_iter)
  if restored is not None:
    start_step, state = restored
    log.info('resumed from step %d', start_step)
  ckpts.write_configs(workdir, cfg, rec, tokenizer)
  first = int(state.step)
  if first >= c.train.steps:
    log.warning('%s is already trained to step %d >= train.steps=%d: nothing to do (raise train.steps to go on)',
                workdir, first, c.train.steps)
    ckpts.close()
    return []

  flops_per_token = flops.train_flops_per_token(cfg, rec, c.data.seq_len, exits=rec.loops,
                                                teacher=cfg if use_teacher else None)
  peak, peak_source = flops.peak_flops(cfg.dtype)
  peak *= jax.device_count()
  log.info('MFU against %.3g FLOP/s (%s, x%d devices)', peak, peak_source, jax.device_count())
  try:
    evaluate = heldout_evaluator(c, cfg, rec, tokenizer, mesh) if c.get('eval_every', 0) else None
    writer = MetricsWriter(workdir, resume_step=first, wandb_init=wandb_init(c, workdir))
  except BaseException:
    ckpts.close()
    raise
  profiler = StepProfiler(c.get('profile'), workdir)
  preemption = Preemption()
  finite = FiniteSteps()
  history = []
  end = c.train.steps if stop_after is None else min(c.train.steps, first + stop_after)
  try:
    from tqdm import tqdm
    bar = tqdm(range(first, end), initial=first, total=c.train.steps, unit='step',
               disable=jax.process_index() != 0, dynamic_ncols=True)
    t0, timed_from = time.perf_counter(), first
    for step in bar:
      profiler.before(step + 1)
      batch = global_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, teacher_vars, batch)
      done = step + 1
      finite.add(done, metrics)
      ckpts.check_for_errors()
      if done == first + 1:
        jax.block_until_ready(state)
        t0, timed_from = time.perf_counter(), done
      stopping = preemption.reached(done) or done == end
      row = {}
      if done % c.log_every == 0 or stopping:
        finite.check(ckpts)
        scalars = to_scalars(metrics)
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
        row.update(scalars)
        bar.set_postfix(loss=f'{scalars["loss"]:.3f}', tok_s=f'{tokens_per_s:,.0f}', mfu=f'{scalars["mfu"]:.1%}')
      # Every eval_every steps and at the last step (not when stopping for a signal: no time to spare then).
      if evaluate is not None and (done % c.eval_every == 0 or (done == end and not preemption.requested)):
        finite.check(ckpts)
        eval_start = time.perf_counter()
        scores = evaluate(state.variables)
        row.update(scores)
        t0 += time.perf_counter() - eval_start  # (Evaluating is not training throughput.)
        ppl = ' '.join(f'{scores[k]:.2f}' for k in sorted(k for k in scores if k.startswith('eval/ppl/')))
        bar.write(f'step {done}: held-out perplexity per loop ({c.eval.split}) {ppl}')  # On the console, not only
        # in metrics.jsonl / TensorBoard.
      if row:
        writer.write(done, row)
        history.append({'step': done, **row})
      profiler.after(done, state)
      if stopping or (ckpts.every_steps > 0 and done % ckpts.every_steps == 0):
        finite.check(ckpts)  # Never save a state that a non-finite loss or gradient produced.
        ckpts.save(done, state, data_iter, force=stopping)
      if preemption.requested and stopping:
        ckpts.wait()
        raise Interrupted(preemption.signal, done, ckpts.directory)
    ckpts.wait()
  finally:
    profiler.stop()
    preemption.restore()
    writer.close()
    ckpts.close()
  return history


def write_config(c: ml_collections.ConfigDict, workdir: str) -> None:
  """<workdir>/config.json: the run's whole experiment config (c.to_json_best_effort), written atomically by
  process 0 when a run starts (a resumed run rewrites it with its own config)."""
  if jax.process_index():
    return
  path, text = as_path(workdir) / CONFIG_JSON, c.to_json_best_effort(indent=2) + '\n'
  if is_uri(workdir):
    path.write_text(text)  # (An object store shows an object whole or not at all.)
  else:
    atomic_write_text(path, text)


def wandb_init(c: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """wandb.init's keyword arguments from the wandb section (None: wandb.project is empty, no W&B)."""
  w = c.get('wandb')
  if w is None or not w.project:
    return None
  return {'project': w.project, 'entity': w.entity or None, 'name': w.name or None,
          'config': json.loads(c.to_json_best_effort()), 'notes': f'workdir {workdir}'}


def heldout_evaluator(c: ml_collections.ConfigDict, cfg: ModelConfig, rec: RecursionConfig, tokenizer,
                      mesh: jax.sharding.Mesh) -> Callable[[dict], dict[str, float]]:
  """variables -> {'eval/loss/loop<i>': mean CE per token, 'eval/ppl/loop<i>': perplexity} at every loop's exit.

  One fixed set of windows, built here once: the first eval.tokens tokens of the packaged split eval.split with the
  run's tokenizer, in windows of data.seq_len (rrt_jax.eval.perplexity.heldout_windows). Scored by the library's
  per_loop_perplexity, on the training variables as they are (sharded global arrays: nothing is gathered to a host),
  traced under the mesh and RULES, so the eval batch (eval.batch windows; 0 = the training micro-batch, capped at
  the windows there are) is split over the batch axes like a training batch. The loss is log(perplexity)."""
  from rrt_jax.eval.perplexity import heldout_windows, per_loop_perplexity
  from rrt_jax.sharding import batch_ways
  windows = heldout_windows(tokenizer, c.eval.split, c.eval.tokens, c.data.seq_len)
  ways = batch_ways(mesh)
  batch = min(c.eval.batch or c.data.global_batch // c.train.grad_accum, -(-len(windows.inputs) // ways) * ways)
  model = Decoder(cfg, rec)
  log.info('held-out eval every %d steps: %d tokens of %s, %d windows of %d, %d per batch', c.eval_every,
           windows.num_tokens, c.eval.split, len(windows.inputs), c.data.seq_len, batch)

  def evaluate(variables: dict) -> dict[str, float]:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
      ppl = per_loop_perplexity(model, variables, windows, batch)
    return {**{f'eval/loss/loop{i}': math.log(p) for i, p in enumerate(ppl, 1)},
            **{f'eval/ppl/loop{i}': p for i, p in enumerate(ppl, 1)}}

  return evaluate


class StepProfiler:
  """A jax.profiler trace of the steps start_step .. start_step + steps - 1 (numbered as in metrics.jsonl) into
  <workdir>/profile, by process 0 only: TensorBoard's profile tab (tensorboard --logdir <workdir>/profile) reads
  its plugins/profile/<run>/<host>.xplane.pb. A run resumed past start_step traces nothing."""

  def __init__(self, profile: ml_collections.ConfigDict | None, workdir: str):
    self.first = -1 if profile is None else profile.start_step
    self.last = self.first + (1 if profile is None else profile.steps) - 1
    self.enabled = self.first >= 1 and jax.process_index() == 0
    self.logdir = str(as_path(workdir) / 'profile')
    self.active = False

  def before(self, step: int) -> None:
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(state)
      self.stop()
      log.info('profiled steps %d-%d into %s', self.first, step, self.logdir)

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


class FiniteSteps:
  """Whether every step's loss and gradient norm were finite, checked without a host sync per step: the flags stay
  on the device until `check` (at log steps and before every save)."""

  def __init__(self):
    self._pending: list[tuple[int, jax.Array]] = []

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])))

  def check(self, ckpts: TrainCheckpoints) -> None:
    flags = jax.device_get([f for _, f in self._pending])
    bad = [step for (step, _), ok in zip(self._pending, flags, strict=True) if not ok]
    self._pending = []
    if bad:
      ckpts.wait()
      good = ckpts.latest_step()
      where = (f'The last good checkpoint is step {good} in {ckpts.directory}; lower train.lr or raise '
               'train.warmup_steps and rerun to resume from it.' if good is not None else
               'No checkpoint was saved before it: lower train.lr or raise train.warmup_steps and rerun (it starts '
               'over from the converted model).')
      raise FloatingPointError(f'loss or gradient is not finite at step {bad[0]}: stopping. {where}')


def uptrain_on_batches(student: Decoder, variables: dict, teacher: Decoder, teacher_variables: dict,
                       batches: list[dict], lr: float, early_exit: str | None = None,
                       trainable: tuple[str, ...] | None = None, exit_alpha: float = 0.1) -> tuple[dict, list[float]]:
  """A short in-memory KD + early-exit uptraining run on given batches (studies: the same batches for every
  variant), single device, no checkpoints: AdamW with 10 % warmup and cosine decay, CE + KD from the original
  model (`teacher` with `teacher_variables`), early-exit weights `early_exit` (default: aggressive for looped
  models, none for one loop; `exit_alpha` weighs each earlier exit under 'aggressive'). trainable: the
  collections trained (None = all; e.g. ('lora',) keeps a low-rank model's zero kernels zero, see
  rrt_jax.convert.low_rank). Returns (variables, per-step losses)."""
  from rrt_jax.train.optimizer import learning_rate_schedule, make_optimizer
  from rrt_jax.train.step import LossConfig
  steps = len(batches)
  tx = make_optimizer(learning_rate_schedule(lr, steps, max(1, steps // 10)))
  if early_exit is None:
    early_exit = 'aggressive' if student.rec.loops > 1 else 'none'
  loss_cfg = LossConfig(ce_weight=1.0, kd_weight=1.0, early_exit=early_exit, exit_alpha=exit_alpha)
  step_fn = jax.jit(make_train_step(student, teacher, tx, loss_cfg, trainable=trainable), donate_argnums=(0,))
  # A fresh copy: conversion shares arrays (the embedding) with the teacher, and the state is donated.
  state = init_state(jax.tree.map(jnp.array, variables), tx, trainable)
  losses = []
  for batch in batches:
    state, metrics = step_fn(state, teacher_variables, batch)
    losses.append(float(metrics['loss']))
  return state.variables, losses
